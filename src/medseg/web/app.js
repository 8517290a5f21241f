// The medseg viewer: upload, follow the job, then show image, mask and uncertainty with NiiVue.
import { Niivue } from "/static/niivue/index.js";

const $ = (id) => document.getElementById(id);
const nv = new Niivue({ backColor: [0, 0, 0, 1], show3Dcrosshair: false, isColorbar: false, crosshairWidth: 1 });
let model = null, job = null, hidden = new Set(), colours = {};
// A server started with a token wants it on every API call, results included: the page takes it from its
// address (/#token=...) once, takes it off the address bar and keeps it in memory only (never in storage).
const token = new URLSearchParams(location.hash.slice(1)).get("token");
if (token) history.replaceState(null, "", location.pathname);
const auth = token ? { Authorization: `Bearer ${token}` } : {};

async function start() {
  await nv.attachTo("gl");
  const answer = await fetch("/api/v1/model", { headers: auth });
  if (!answer.ok) return fail((await answer.json()).detail);
  model = await answer.json();
  colours = { ...model.colours };
  $("model").textContent = `Segments: ${model.class_names.slice(1).join(", ")}`;
  $("upload").addEventListener("submit", upload);
  $("opacity").addEventListener("input", () => { nv.setOpacity(1, +$("opacity").value); });
  $("view").addEventListener("change", () => { nv.setSliceType(+$("view").value); });
  $("slice").addEventListener("input", moveSlice);
  $("window").addEventListener("input", windowLevel);
  $("level").addEventListener("input", windowLevel);
  $("uncertainty").addEventListener("change", () => { if (nv.volumes[2]) nv.setOpacity(2, $("uncertainty").checked ? 0.6 : 0); });
  window.medseg = { nv, state: () => ({ job, hidden: [...hidden] }), overlayPixels };
}

async function upload(event) {
  event.preventDefault();
  const file = $("file").files[0];
  if (!file) return;
  const body = new FormData();
  body.append("file", file);
  $("status").className = "";
  $("status").textContent = `uploading ${file.name}`;
  $("progress").hidden = false;
  const answer = await fetch("/api/v1/segment", { method: "POST", body, headers: auth });
  const reply = await answer.json();
  if (!answer.ok) return fail(reply.detail);
  follow(reply.id);
}

async function follow(id) {
  job = await (await fetch(`/api/v1/jobs/${id}`, { headers: auth })).json();
  $("progress").value = job.progress;
  $("status").textContent = `${job.name}: ${job.status}`;
  if (job.status === "failed") return fail(job.error);
  if (job.status !== "done") return setTimeout(() => follow(id), 300);
  await show(job);
  $("status").textContent = `${job.name}: done`;
  document.body.dataset.state = "shown";
}

function fail(message) {
  $("status").className = "error";
  $("status").textContent = message;
  $("progress").hidden = true;
  document.body.dataset.state = "failed";
}

function labelColormap() {
  const names = model.class_names, lut = { R: [0], G: [0], B: [0], A: [0], I: [0], labels: names };
  names.slice(1).forEach((name, k) => {
    const hex = colours[name] || "#ff0000";
    lut.R.push(parseInt(hex.slice(1, 3), 16)); lut.G.push(parseInt(hex.slice(3, 5), 16));
    lut.B.push(parseInt(hex.slice(5, 7), 16)); lut.A.push(hidden.has(name) ? 0 : 255); lut.I.push(k + 1);
  });
  return lut;
}

async function show(job) {
  const r = job.results;
  await nv.loadVolumes([  // NiiVue fetches them with the token's header
    { url: r["image.nii.gz"], headers: auth, colormap: "gray" },
    { url: r["mask.nii.gz"], headers: auth, opacity: +$("opacity").value },
    { url: r["uncertainty.nii.gz"], headers: auth, colormap: "hot", opacity: 0, cal_min: 0, cal_max: 1 },
  ]);
  nv.volumes[1].setColormapLabel(labelColormap());
  nv.updateGLVolume();
  const volume = job.dims === 3;
  $("planes").hidden = !volume;
  nv.setSliceType(volume ? +$("view").value : 0);
  nv.setCrosshairWidth(volume ? 1 : 0);  // a 2D image needs no crosshair
  $("controls").hidden = false;
  $("progress").hidden = true;
  buildClasses();
  buildDownloads(r);
  windowLevel();
}

function buildClasses() {
  const box = $("classes");
  // class names come from a model package, which anyone may have written: set as text, never as HTML
  box.replaceChildren();
  for (const name of model.class_names.slice(1)) {
    const row = document.createElement("label"), shown = document.createElement("input");
    const colour = document.createElement("input");
    row.className = "class";
    shown.type = "checkbox"; shown.checked = true; shown.dataset.class = name;
    colour.type = "color"; colour.value = colours[name] || "#ff0000"; colour.dataset.colour = name;
    shown.addEventListener("change", () => { shown.checked ? hidden.delete(name) : hidden.add(name); recolour(); });
    colour.addEventListener("input", () => { colours[name] = colour.value; recolour(); });
    row.append(shown, " ", colour, " ", document.createTextNode(name));
    box.appendChild(row);
  }
}

function recolour() {
  nv.volumes[1].setColormapLabel(labelColormap());
  nv.updateGLVolume();
}

// Downloads go through fetch with the token's header: the job's address is never a link the browser keeps
function buildDownloads(r) {
  const names = { "mask.nii.gz": "NIfTI", "mask.png": "PNG", "mask.seg.dcm": "DICOM SEG" };
  const box = $("downloads");
  box.replaceChildren();
  for (const [file, label] of Object.entries(names).filter(([f]) => r[f])) {
    const button = document.createElement("button");
    button.type = "button"; button.textContent = label; button.dataset.format = label;
    button.addEventListener("click", () => download(r[file], file));
    box.append(button, " ");
  }
}

async function download(url, file) {
  const answer = await fetch(url, { headers: auth, cache: "no-store" });
  if (!answer.ok) return fail(`download failed (${answer.status})`);
  const blob = await answer.blob(), link = document.createElement("a");
  link.href = URL.createObjectURL(blob);
  link.download = `${job.name.split(".")[0]}_${file}`;
  link.click();
  setTimeout(() => URL.revokeObjectURL(link.href), 1000);
  window.medsegLastDownload = blob;  // what the tests read back
}

function moveSlice() {
  const view = +$("view").value, axis = view === 3 ? 2 : [2, 1, 0][view];
  nv.scene.crosshairPos[axis] = +$("slice").value;
  nv.drawScene();
}

function windowLevel() {
  const image = nv.volumes[0];
  if (!image) return;
  const low = image.global_min, span = image.global_max - image.global_min;
  const width = +$("window").value * span, level = low + +$("level").value * span;
  image.cal_min = level - width / 2;
  image.cal_max = level + width / 2;
  nv.updateGLVolume();
}

// How many canvas pixels the mask layer changes: drawn with and without it, compared (tests call this)
function overlayPixels() {
  const grab = () => {
    nv.drawScene();
    const canvas = document.createElement("canvas");
    canvas.width = nv.gl.canvas.width; canvas.height = nv.gl.canvas.height;
    const context = canvas.getContext("2d");
    context.drawImage(nv.gl.canvas, 0, 0);
    return context.getImageData(0, 0, canvas.width, canvas.height).data;
  };
  const opacity = nv.volumes[1].opacity;
  const withMask = grab();
  nv.setOpacity(1, 0);
  const without = grab();
  nv.setOpacity(1, opacity);
  let changed = 0;
  for (let i = 0; i < withMask.length; i += 4) {
    if (Math.abs(withMask[i] - without[i]) + Math.abs(withMask[i + 1] - without[i + 1]) + Math.abs(withMask[i + 2] - without[i + 2]) > 30) changed++;
  }
  return changed;
}

start();
