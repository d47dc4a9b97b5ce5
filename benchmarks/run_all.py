"""Run every benchmark script in this folder (bench_*.py, then the layer suite suite.py) with its
default arguments."""
import pathlib
import subprocess
import sys

here = pathlib.Path(__file__).parent
for script in [*sorted(here.glob("bench_*.py")), here / "suite.py"]:
    print(f"\n=== {script.name} ===", flush=True)
    subprocess.run([sys.executable, str(script)], check=True)
