"""Train what a plan configures: one network, or the members of an ensemble side by side, one process each.

`medseg train DATA` with no recipe flag lands here: fingerprint -> plan (`medseg.recipe`) -> train. An ensemble's
run folder is the ensemble (RUN/ensemble.json naming RUN/<member>/ runs, RUN/plan.json), so `medseg evaluate RUN`,
`predict` and `report` take it as they take a single run. Members share the seed, so they share the validation
and test cases, and every member gets the whole time budget on its own share of the cores.
"""
from __future__ import annotations

import json
import multiprocessing
import time
from dataclasses import asdict
from pathlib import Path

from medseg.config import READING_FIELDS, TrainConfig
from medseg.io import write_text_atomic


def planned_members(data: str | Path, budget_minutes: float, overrides: dict, device: str = "auto",
                    progress: bool = True) -> tuple[dict[str, TrainConfig], dict]:
    """Fingerprint and plan DATA (`medseg.recipe`), print the plan's paragraph, and return each network's
    settings with `overrides` (the user's explicit settings) on top, and the plan."""
    from medseg.checkpoint import resolve_device
    from medseg.plan import make_plan
    from medseg.recipe import describe

    started = time.monotonic()
    device = str(resolve_device(overrides.get("device", device)))
    split = {k: overrides[k] for k in ("seed", "test_fraction") if overrides.get(k) is not None}
    plan = make_plan(data, budget_minutes, device, data_options={k: overrides.get(k) for k in READING_FIELDS},
                     alternatives=False, cores=overrides.get("threads"), **split)
    print(describe(plan["configurations"]["auto"], plan["reasons"]), flush=True)
    changed, added = overridden(plan["configurations"]["auto"]["members"], overrides)
    if changed:
        print(f"Your flags override the plan: {changed}.", flush=True)
    if added:
        print(f"Your flags add to the plan: {added}.", flush=True)
    members = configs_from_plan(plan, None, data, overrides, progress)
    for cfg in members.values():  # the plan's time counts in the budget
        cfg.planning_seconds = round(time.monotonic() - started, 1)
    return members, plan


# what the data is and where the run goes: the user's to say, not a change to the recipe
NOT_RECIPE = (*READING_FIELDS, "data", "out", "class_names", "device", "threads", "progress")


def overridden(members: dict, overrides: dict) -> tuple[str, str]:
    """The user's settings that differ from what the plan chose, and those the plan leaves at medseg's defaults
    that the user changed (`--elastic-p 0.5`), each as flags ("--base-channels 32")."""
    planned = set().union(*members.values())
    changed = {key: value for key, value in overrides.items()
               if any(key in m and m[key] != value for m in members.values())}
    added = {key: value for key, value in overrides.items()
             if key not in planned and key not in NOT_RECIPE and value != getattr(TrainConfig, key, None)}
    return tuple(", ".join(f"--{key.replace('_', '-')} {value}" for key, value in settings.items())
                 for settings in (changed, added))


def configs_from_plan(plan: dict, configuration: str | None, data: str | Path | None, overrides: dict,
                      progress: bool = True, where: str = "plan") -> dict[str, TrainConfig]:
    from medseg.plan import plan_members

    members = {}
    for name, settings in plan_members(plan, configuration, where).items():
        cfg = TrainConfig(**settings)
        if data:
            cfg.data = str(data)
        cfg.override(overrides)
        _check_held_out(plan, cfg, where)
        if cfg.regions and "border_weight" not in overrides:
            cfg.border_weight = 0.0  # the plan's weight map is for a cross-entropy over classes; regions train on BCE
        cfg.progress = progress
        members[name] = cfg
    return members


def _check_held_out(plan: dict, cfg: TrainConfig, where: str) -> None:
    """Say so when a run's test cases are not the ones its plan left unread (another --seed or --test-fraction):
    the planner then read some of the cases the run reports on."""
    from medseg.console import notice

    held = plan.get("fingerprint", {}).get("held_out")
    if held and (held["seed"], held["test_fraction"]) != (cfg.seed, cfg.test_fraction):
        notice(f"{where} was planned with the test cases of --seed {held['seed']} --test-fraction "
               f"{held['test_fraction']} left unread; this run (--seed {cfg.seed} --test-fraction "
               f"{cfg.test_fraction}) holds out others, some of which the planner read. Plan again with "
               f"'medseg plan DATA --seed {cfg.seed} --test-fraction {cfg.test_fraction}' for test cases that "
               "chose nothing")


def plan_and_train(data: str | Path, out: str | Path, time_budget: float = 30.0, overwrite: bool = False,
                   progress: bool = True, **overrides) -> Path:
    """What `medseg train DATA --time-budget M` does, from Python: plan, then train one network or the planned
    ensemble; `overrides` are TrainConfig fields that win over the plan. Returns the run (or ensemble) folder."""
    members, plan = planned_members(data, time_budget, {"time_budget": time_budget, **overrides},
                                    progress=progress)
    return train_members(members, out, plan, overwrite)


def train_members(members: dict[str, TrainConfig], out: str | Path, plan: dict | None = None,
                  overwrite: bool = False) -> Path:
    """Train each configuration (its `out` is set here) and return the run folder: the run itself for one
    member, else OUT holding the members and an ensemble.json."""
    from medseg.train import create_run_dir, train

    out = Path(out)
    for config in members.values():
        config.validate()
    if len(members) == 1:
        (config,) = members.values()
        config.out = str(out)
        run = train(config, overwrite=overwrite)
        if plan is not None:
            write_text_atomic(run / "plan.json", json.dumps(plan, indent=2))
        return run
    from medseg.ensemble import create_ensemble

    run = create_run_dir(out, overwrite, kind="ensemble")
    if plan is not None:
        write_text_atomic(run / "plan.json", json.dumps(plan, indent=2))
    context = multiprocessing.get_context("spawn")
    with context.Manager() as manager:
        together = manager.Barrier(len(members), timeout=1800)  # members calibrate at the same time
        jobs = []
        for name, config in members.items():
            config.out = str(run / name)
            jobs.append((name, asdict(config), together))
        with context.Pool(len(jobs)) as pool:
            paths = pool.map(_train_member, jobs)
            pool.close()  # joined, not terminated: a terminated pool leaves semaphores behind (and a warning)
            pool.join()
    create_ensemble([Path(p) for p in paths], run)
    return run


def resume(run: str | Path, progress: bool = True) -> Path:
    """Continue a stopped run, or each unfinished member of a stopped ensemble (side by side, as they trained),
    then write the ensemble's manifest."""
    from medseg.ensemble import create_ensemble
    from medseg.errors import MedsegError
    from medseg.resume import resume_run

    run = Path(run)
    if (run / "config.json").exists() or not (run / "plan.json").exists():
        return resume_run(run, progress)
    names = list(json.loads((run / "plan.json").read_text())["configurations"]["auto"]["members"])
    missing = [name for name in names if not (run / name / "config.json").exists()]
    if missing:
        raise MedsegError(f"{run / missing[0]}: this member never started, so the ensemble cannot be resumed; "
                          "train it again with 'medseg train DATA --out RUN --overwrite'")
    unfinished = [name for name in names if not (run / name / "train_summary.json").exists()]
    if unfinished:
        context = multiprocessing.get_context("spawn")
        with context.Pool(len(unfinished)) as pool:
            pool.map(_resume_member, [(name, str(run / name), progress) for name in unfinished])
            pool.close()
            pool.join()
    create_ensemble([run / name for name in names], run)
    return run


def _resume_member(job: tuple) -> str:
    import importlib

    from medseg.resume import resume_run

    name, path, progress = job
    importlib.import_module("medseg.train").LINE_PREFIX = f"{name}: "
    return str(resume_run(path, progress))


def _train_member(job: tuple) -> str:
    """One member in its own process (its own threads); its lines carry its name, and it times its steps only
    when every member does."""
    import importlib

    from medseg import budget

    name, settings, together = job
    module = importlib.import_module("medseg.train")  # the module: the package exports a function of that name
    module.LINE_PREFIX = f"{name}: "
    budget.SIDE_BY_SIDE = together
    try:
        return str(module.train(TrainConfig(**settings)))
    except BaseException:
        together.abort()  # a member that failed before timing must not leave the others waiting
        raise
