#!/usr/bin/env bash
# Set up (first time) and run the test suite. Extra arguments go to pytest.
source "$(dirname "$0")/env.sh"
python -m pytest -q "$@"
