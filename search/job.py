"""A search submitted with `ray job submit --working-dir .`: it runs in Ray's temporary copy of
that folder, which Ray deletes after the job. What a search writes there is lost with it, so the
records and Ray's state must go elsewhere; the feature cache may go to the node's own folder."""

from __future__ import annotations

import json
import os
from pathlib import Path
from urllib.parse import urlparse

from mmsa.errors import UserError
from mmsa.app.run_tags import sqlite_file

# Set by Ray's job supervisor for the entrypoint of a submitted job: {"runtime_env": ..., ...}.
JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"


def job_working_dir() -> Path | None:
    """The temporary copy of --working-dir this search runs in as a submitted Ray job, else None."""
    raw = os.environ.get(JOB_CONFIG_ENV)
    if not raw:
        return None
    try:
        runtime_env = json.loads(raw).get("runtime_env") or {}
    except (ValueError, AttributeError):
        return None
    return Path.cwd().resolve() if runtime_env.get("working_dir") else None


def local_path(uri: str) -> Path | None:
    """The local file or folder a tracking URI or storage location names; None for a server or a
    cloud bucket."""
    path = sqlite_file(uri)
    if path is not None:
        return path
    parsed = urlparse(uri)
    if parsed.scheme == "file":
        return Path(parsed.path)
    return Path(uri) if not parsed.scheme or len(parsed.scheme) == 1 else None  # C:\ is a path


def inside(path: Path, folder: Path) -> bool:
    return path.resolve().is_relative_to(folder)


def check_job_locations(job_dir: Path, tracking_uri: str, storage: str, data_dir: str) -> None:
    """Refuse, in one line, a record store or a dataset that would live in the job's temporary copy."""
    why = f"this search runs as a Ray job, in a copy of --working-dir ({job_dir}) that Ray deletes after the job"
    tracking = local_path(tracking_uri)
    if tracking is not None and inside(tracking, job_dir):
        raise UserError(f"--tracking-uri {tracking_uri}: {why}, and its records would go with it; give a tracking "
                        f"server (--tracking-uri http://HOST:5000, see the README) or sqlite:////ABSOLUTE/PATH")
    state = local_path(storage)
    if state is not None and inside(state, job_dir):
        raise UserError(f"--storage {storage}: {why}, and the search's state would go with it; give "
                        f"s3://BUCKET/PATH, gs://BUCKET/PATH or a folder outside it (file:///ABSOLUTE/PATH)")
    if not Path(data_dir).is_absolute() and not Path(data_dir).exists():
        raise UserError(f"--data {data_dir}: not in the job's copy of --working-dir ({job_dir}); give the "
                        f"dataset's absolute path on the cluster's nodes")


def job_cache_dir(job_dir: Path, cache_dir: str, node_cache: str | None) -> str | None:
    """Where the driver should keep the feature cache instead of `cache_dir`, or None to keep it:
    a cache inside the job's copy would be rebuilt by every job, while the node's own folder
    ($MMSA_CACHE_DIR, set where the head was started) outlives them."""
    if node_cache and inside(Path(cache_dir), job_dir):
        return node_cache
    return None
