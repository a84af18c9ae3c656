"""The README's main command, `pip install .` (not editable), into a fresh environment: then `import gpurnn` and
`python -m gpurnn info` work from the repository root (where the source folder `gpurnn/`, which has no
`kernels/` inside, shadows the installed package) and from anywhere else (the installed package)."""
import importlib.util
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SKIP = shutil.ignore_patterns(".git", ".venv", "venv", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache",
                              ".asv", "html", "runs", ".hypothesis")
PROBE = "import gpurnn, gpurnn.kernels; print(gpurnn.__file__); print(gpurnn.kernels.__file__)"


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(a copy of the source tree, the python of a fresh venv where `pip install .` put gpurnn)."""
    tmp = tmp_path_factory.mktemp("install")
    source = tmp / "src"
    shutil.copytree(ROOT, source, ignore=SKIP)
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=300)
    python = str(venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python"))
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    # The dependencies (numpy, numba, ...) come from this interpreter's site folders, added as plain paths: their
    # own .pth files (an editable gpurnn among them) are not run, so the only gpurnn installed is the one below.
    deps = [p for p in sys.path if os.path.basename(p) in ("site-packages", "dist-packages") and os.path.isdir(p)]
    with open(os.path.join(site, "dependencies.pth"), "w") as f:
        f.write("\n".join(deps) + "\n")
    isolation = ["--no-build-isolation"] if importlib.util.find_spec("setuptools") else []
    done = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", *isolation, "--target", site,
                           str(source)], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr
    return source, python, site


def run(python, cwd, *args):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    return subprocess.run([python, *args], cwd=cwd, capture_output=True, text=True, timeout=300, env=env)


def test_the_installed_package_holds_its_kernels(installed, tmp_path):
    source, python, site = installed
    done = run(python, tmp_path, "-c", PROBE)
    assert done.returncode == 0, done.stderr
    package, kernels = done.stdout.split()
    assert package == os.path.join(site, "gpurnn", "__init__.py")
    assert kernels == os.path.join(site, "gpurnn", "kernels", "__init__.py")


def test_import_and_python_dash_m_work_from_the_repository_root(installed):
    source, python, _ = installed
    done = run(python, source, "-c", PROBE)
    assert done.returncode == 0, done.stderr
    package, kernels = done.stdout.split()
    assert package == str(source / "gpurnn" / "__init__.py")         # the source folder shadows the install ...
    assert kernels == str(source / "kernels" / "__init__.py")         # ... and maps gpurnn.kernels to kernels/
    done = run(python, source, "-m", "gpurnn", "info")
    assert done.returncode == 0, done.stderr
    assert "numpy" in done.stdout.split("backends: ")[1].split("\n")[0]
