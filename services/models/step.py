"""The DOWNLOADING boot step (and `comfy-machine models`): workflows read, yaml written,
``before_start`` models fetched and verified; ``background`` ones left for later."""

from __future__ import annotations

import logging
from pathlib import Path

from config.models import model_specs
from config.settings import Settings
from services.models.download import FetchOptions
from services.models.errors import ModelError
from services.models.extra_paths import write_extra_model_paths
from services.models.fetcher import ModelFetcher
from services.models.instance_check import needs_check
from services.models.workflows import read_workflows
from services.state import MachineState

log = logging.getLogger(__name__)


def make_fetcher(settings: Settings, state: MachineState) -> ModelFetcher:
    """Register the manifest and the workflows' references in ``state``; the fetcher."""
    refs, errors = read_workflows(list(settings.workflows))
    state.workflow_refs, state.workflow_errors = refs, errors
    for error in errors:
        log.error("workflow unreadable", extra={"fields": {"error": error}})
    state.models_configured = bool(settings.models or settings.workflows)
    fetcher = ModelFetcher(
        model_specs(settings.models),
        settings.models_path,
        state,
        workers=settings.download_workers,
        options=FetchOptions(retries=settings.download_retries),
    )
    needed = needs_check(state)
    for inst in state.instances.values():
        inst.model_check_needed = needed
    return fetcher


def failure(failed: list, what: str) -> ModelError:
    names = ", ".join(m.name for m in failed)
    details = "; ".join(m.error or m.name for m in failed)
    return ModelError(f"{len(failed)} required {what} model(s) not verified ({names}): {details}")


async def models_step(
    settings: Settings, state: MachineState, yaml_path: Path | None, yaml_text: str
) -> ModelFetcher:
    """Write the yaml, fetch ``before_start`` models; ModelError if a required one failed."""
    write_extra_model_paths(yaml_path, yaml_text, settings.models_path)
    fetcher = make_fetcher(settings, state)
    failed = [m for m in await fetcher.run("before_start") if m.required]
    if failed:
        raise failure(failed, "before_start")
    return fetcher


async def fetch_background(fetcher: ModelFetcher) -> None:
    """Fetch ``background`` models after the instances started; failures stay in health."""
    failed = await fetcher.run("background")
    if failed:
        log.error(
            "background models failed", extra={"fields": {"models": [m.name for m in failed]}}
        )
