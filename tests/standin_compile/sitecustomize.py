"""A stand-in for a slow torch.compile, for tests/test_preflight.py: on PYTHONPATH there, it runs in
every Python process the preflight starts. STANDIN_COMPILE maps a script's file name to the seconds
each graph takes to "compile" in a process of that script (then the graph runs eagerly); the process
appends a line to the file SCRIPT.PID in the folder STANDIN_PIDS as it starts each compile, so that a
test can count the compiles and check that the process was stopped. Processes of other scripts are left alone."""
import json
import os
import sys
from pathlib import Path

SCRIPT = Path(sys.argv[0]).name if sys.argv else ""
SECONDS = json.loads(os.environ.get("STANDIN_COMPILE", "{}")).get(SCRIPT)

if SECONDS is not None:
    import time

    import torch

    def slow_backend(graph, example_inputs):
        with open(Path(os.environ["STANDIN_PIDS"]) / f"{SCRIPT}.{os.getpid()}", "a") as compiles:
            compiles.write("a graph\n")
        time.sleep(SECONDS)
        return graph.forward

    compile_with_inductor = torch.compile
    torch.compile = lambda model=None, **options: compile_with_inductor(model, **{**options, "backend": slow_backend})
