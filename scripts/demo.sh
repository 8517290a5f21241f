#!/usr/bin/env bash
# Set up (first time) and run the demo: phantoms -> trained U-Net -> metrics and figures.
source "$(dirname "$0")/env.sh"
medseg demo "$@"
