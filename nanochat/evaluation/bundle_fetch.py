"""Getting a CORE eval bundle in place: fetch and extract DCLM's, or build the offline one.

Stage base-eval (and base_train's periodic CORE) call ``ensure(base, name)``. The DCLM bundle
comes from one archive, ``OFFICIAL_URL`` (or a mirror URL or a local zip given as ``source``);
the ``embedded`` one is built here by nanochat/offline/embedded_core.py. Both are read with the
format of nanochat/evaluation/eval_bundle.py. Layout under ``BASE_DIR/eval_bundle/``:

    dclm.zip            the downloaded archive, kept so a damaged folder re-extracts offline
    dclm.zip.sha256     its sha256, recorded after the first download (sha256sum format)
    dclm/               the extracted bundle (core.yaml, eval_meta_data.csv, eval_data/) plus
                        bundle.json (where it came from, the archive's sha256)
    embedded/           the offline miniature bundle

The archive is fetched by the shard downloader (nanochat/data/download.py, ``fetch_one``):
streamed into a temp file, checked (a zip whose CRCs hold, with core.yaml, eval_meta_data.csv
and every data file core.yaml names) and only then renamed into place; transient failures are
retried with jittered exponential backoff. Extraction goes into a temp folder renamed into
place, with ``bundle.json`` written last, so a folder that has it is complete; a complete bundle
is never fetched again. A lock on the folder serializes concurrent runs.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
import zipfile
from collections.abc import Sequence
from pathlib import Path

from nanochat.common import atomic_write_text, file_sha256, lock_folder, log, one_line
from nanochat.data.download import Job, fetch_one
from nanochat.evaluation.eval_bundle import (
    BUNDLES,
    CORE_YAML,
    DATA_DIR,
    META_CSV,
    RECORD,
    Bundle,
    BundleError,
    bundle_dir,
    bundle_root,
    folder_complete,
    load_bundle,
    parse_baselines,
    parse_tasks,
    replace_folder,
    sweep,
)
from nanochat.offline.embedded_core import ensure_embedded_bundle

OFFICIAL_URL = "https://karpathy-public.s3.us-west-2.amazonaws.com/eval_bundle.zip"


# ----------------------------------------------------------------------------- the archive


def _zip_prefix(names: Sequence[str]) -> str | None:
    """The folder inside the archive that holds core.yaml ('' or 'eval_bundle/'), the
    shallowest one when there are several; None when there is none."""
    found = [n[: -len(CORE_YAML)] for n in names if n == CORE_YAML or n.endswith("/" + CORE_YAML)]
    return min(found, key=lambda p: (p.count("/"), p)) if found else None


def verify_zip(path: Path) -> str | None:
    """None when ``path`` is a complete bundle archive, else the reason in a few words:
    the zip opens, every member's CRC holds, and it has core.yaml, eval_meta_data.csv and
    every data file core.yaml names (all in one folder)."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            prefix = _zip_prefix(names)
            if prefix is None:
                return f"no {CORE_YAML} in the archive"
            if prefix + META_CSV not in names:
                return f"no {META_CSV} beside {CORE_YAML}"
            try:
                baselines = parse_baselines(archive.read(prefix + META_CSV).decode("utf-8"))
                tasks = parse_tasks(archive.read(prefix + CORE_YAML).decode("utf-8"), baselines)
            except (ValueError, UnicodeDecodeError) as exc:
                return one_line(exc)
            members = set(names)
            for task in tasks:
                if f"{prefix}{DATA_DIR}/{task.dataset_uri}" not in members:
                    return f"{DATA_DIR}/{task.dataset_uri} (task {task.label}) is missing"
            bad = archive.testzip()
            if bad is not None:
                return f"{bad} is damaged (CRC mismatch)"
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError) as exc:
        return f"not a readable zip archive ({one_line(exc)}; truncated?)"
    except OSError as exc:
        return f"cannot read it ({one_line(exc)})"
    return None


def fetch(
    url: str,
    dest: Path,
    *,
    retries: int = 5,
    retry_delay: float = 2.0,
    timeout: float = 60.0,
) -> tuple[int, str]:
    """GET ``url`` into ``dest`` atomically, verified with ``verify_zip``: (size, sha256).

    The shard downloader's rules: transient failures (5xx, 408/429, dropped connections,
    short or invalid bodies) are retried with jittered exponential backoff; BundleError
    after the last attempt, or at once on a 4xx.
    """
    job = Job(url, Path(dest), "dclm", verify=verify_zip, label="eval bundle")
    result, error = fetch_one(job, retries=retries, retry_delay=retry_delay, timeout=timeout)
    if error is not None:
        raise BundleError(error)
    return result


def extract(archive_path: Path, final: Path, record: dict) -> None:
    """Unpack the bundle folder of a verified archive into ``final`` atomically, with
    ``record`` as its bundle.json (written last)."""
    final = Path(final)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        with zipfile.ZipFile(archive_path) as archive:
            prefix = _zip_prefix(archive.namelist())
            members = [n for n in archive.namelist() if n.startswith(prefix or "")]
            archive.extractall(tmp, members)  # extractall drops absolute paths and '..'
        inner = tmp / prefix if prefix else tmp
        atomic_write_text(inner / RECORD, json.dumps(record, indent=2) + "\n")
        replace_folder(inner, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ----------------------------------------------------------------------------- the bundles


def _is_url(source: str) -> bool:
    return source.startswith(("http://", "https://"))


def _read_recorded_sha(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8").split()[0]
    except (OSError, IndexError):
        return None


def ensure_dclm(
    base: Path,
    source: str | None = None,
    *,
    retries: int = 5,
    retry_delay: float = 2.0,
    timeout: float = 60.0,
) -> Path:
    """The extracted DCLM bundle folder under ``base``, fetched and extracted if needed.

    ``source``: a mirror URL or a local zip (default: the official URL). A complete folder is
    used as is (nothing is fetched, whatever ``source`` says: delete the folder to replace
    it). Raises BundleError with the reason and the fix.
    """
    root = bundle_root(base)
    final = bundle_dir(base, "dclm")
    if folder_complete(final):
        return final
    with lock_folder(root):
        if folder_complete(final):  # another run finished it while we waited
            return final
        sweep(root, "dclm")
        if source is not None and not _is_url(source):
            archive = Path(source).expanduser()
            if not archive.is_file():
                raise BundleError(f"--source {source}: no such file (give a zip or a URL)")
            reason = verify_zip(archive)
            if reason is not None:
                raise BundleError(f"--source {source} is not a complete eval bundle: {reason}")
            origin = str(archive.resolve())
            digest = file_sha256(archive)
        else:
            origin = source or OFFICIAL_URL
            archive, digest = _download(root, origin, retries, retry_delay, timeout)
        record = {
            "name": "dclm",
            "source": origin,
            "sha256": digest,
            "bytes": archive.stat().st_size,
            "extracted": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        extract(archive, final, record)
    if not folder_complete(final):
        raise BundleError(f"the eval bundle extracted into {final} is incomplete")
    return final


def _download(
    root: Path, url: str, retries: int, retry_delay: float, timeout: float
) -> tuple[Path, str]:
    """``root/dclm.zip`` fetched from ``url`` (or reused when its sha256 matches the record
    and it verifies), and its sha256, recorded in ``dclm.zip.sha256`` after the first
    download. A later download with another hash is reported and recorded."""
    archive = root / "dclm.zip"
    record_path = root / "dclm.zip.sha256"
    recorded = _read_recorded_sha(record_path)
    if archive.is_file() and recorded == file_sha256(archive) and verify_zip(archive) is None:
        log(f"eval bundle: re-extracting {archive} (its sha256 matches the record)")
        return archive, recorded
    start = time.monotonic()
    log(f"eval bundle: downloading {url}")
    size, digest = fetch(url, archive, retries=retries, retry_delay=retry_delay, timeout=timeout)
    log(f"eval bundle: {size / 1e6:.1f} MB in {time.monotonic() - start:.1f} s -> {archive}")
    if recorded is not None and recorded != digest:
        log(
            f"eval bundle: warning: sha256 {digest[:12]}... differs from the one recorded at "
            f"the first download ({recorded[:12]}..., {record_path}); recording the new one"
        )
    if recorded != digest:
        atomic_write_text(record_path, f"{digest}  {archive.name}\n")
    return archive, digest


def ensure(base: Path, name: str, source: str | None = None, **fetch_options) -> Bundle:
    """The bundle ``name`` ('dclm' or 'embedded'), fetched or built when needed, then loaded."""
    if name == "embedded":
        if source is not None:
            raise BundleError("--source applies to the dclm bundle only (embedded is built here)")
        folder = ensure_embedded_bundle(base)
    elif name == "dclm":
        folder = ensure_dclm(base, source, **fetch_options)
    else:
        raise BundleError(f"unknown bundle {name!r}; choose one of {', '.join(BUNDLES)}")
    return load_bundle(folder, name)


def ensure_on_all_ranks(base: Path, name: str, rt, source: str | None = None) -> Bundle:
    """``ensure`` under torchrun: rank 0 fetches or builds the bundle while the others wait,
    then every rank loads it. A failure is a BundleError on every rank (rank 0's reason; the
    others only know that rank 0 could not get it), so all stop together."""
    from nanochat import runtime

    bundle = error = None
    if rt.master:
        try:
            bundle = ensure(base, name, source)
        except BundleError as exc:
            error = str(exc)
    if runtime.all_agree(error is not None, rt):
        raise BundleError(error or "rank 0 could not get it")
    return bundle if bundle is not None else load_bundle(bundle_dir(base, name), name)
