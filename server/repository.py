"""The model repository: scan ``<root>/<model>/<version>/model.onnx``, apply version policies, track states.

Request-supplied names and versions are looked up in dictionaries built from the scan; they are
validated first and never joined onto a filesystem path.
"""

from __future__ import annotations

import asyncio
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

from .errors import InvalidInputError, ModelNotFoundError, ModelNotReadyError
from .metrics import Metrics
from .model_config import MODEL_FILE, NAME_PATTERN, ModelConfig, ModelConfigError, load_config
from .served_model import ModelState, ServedModel
from .settings import Settings

log = logging.getLogger(__name__)

_VERSION_DIR = re.compile(r"^[0-9]{1,18}$")


@dataclass
class ModelEntry:
    """One model folder: its config (None when unreadable), the reason it is broken, its served versions."""

    name: str
    path: Path
    config: ModelConfig | None
    error: str = ""
    versions: dict[int, ServedModel] = field(default_factory=dict)
    on_disk: list[int] = field(default_factory=list)

    def latest_ready(self) -> ServedModel | None:
        for version in sorted(self.versions, reverse=True):
            sm = self.versions[version]
            if sm.ready:
                return sm
        return None

    def describe_failure(self) -> str:
        if self.error:
            return self.error
        parts = [
            f"version {v.version} is {v.state.value}" + (f" ({v.reason})" if v.reason else "")
            for v in self.versions.values()
        ]
        return "; ".join(parts) or "no versions"


def validate_model_name(name: str, where: str = "model") -> str:
    """Return ``name`` if it is a well-formed model name, else raise InvalidInputError."""
    if not name:
        raise InvalidInputError(f"{where}: expected a model name, got an empty string")
    if not NAME_PATTERN.match(name):
        shown = name if len(name) <= 80 else name[:77] + "..."
        raise InvalidInputError(
            f"{where}: expected a model name matching {NAME_PATTERN.pattern}, got {shown!r}"
        )
    return name


def parse_version(text: str, where: str = "model_version") -> int:
    """A v2 version string → int; "" means latest (0)."""
    if text == "":
        return 0
    if not _VERSION_DIR.match(text):
        shown = text if len(text) <= 40 else text[:37] + "..."
        raise InvalidInputError(
            f"{where}: expected a positive integer version or empty for the latest, got {shown!r}"
        )
    return int(text)


class ModelRepository:
    """Every model found at start, each with the versions its policy selects, in a known state."""

    def __init__(self, root: str | Path, settings: Settings, metrics: Metrics) -> None:
        self.root = Path(root)
        self.settings = settings
        self.metrics = metrics
        self._entries: dict[str, ModelEntry] = {}
        self.loaded = False

    # ---- scanning and loading --------------------------------------------------------------------

    def scan(self) -> None:
        """Read every model's config and register its selected versions as LOADING (fast, no ONNX)."""
        if not self.root.is_dir():
            log.error("model repository %s does not exist or is not a folder; serving no models", self.root)
            return
        for model_dir in sorted(p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith(".")):
            name = model_dir.name
            if not NAME_PATTERN.match(name):
                log.warning(
                    "skipping %s: folder name is not a valid model name (%s)", model_dir, NAME_PATTERN.pattern
                )
                continue
            self._entries[name] = self._scan_model(model_dir)

    def _scan_model(self, model_dir: Path) -> ModelEntry:
        name = model_dir.name
        on_disk = sorted(
            int(p.name) for p in model_dir.iterdir() if p.is_dir() and _VERSION_DIR.match(p.name)
        )
        try:
            cfg = load_config(model_dir)
        except ModelConfigError as exc:
            entry = ModelEntry(name, model_dir, None, error=self._public(f"config: {exc}"), on_disk=on_disk)
            log.error(
                "model %s: %s", name, entry.error, extra={"fields": {"event": "model_failed", "model": name}}
            )
            for v in on_disk:  # listed as failed so that /metrics and ListModels show why nothing serves
                self.metrics.set_model_state(name, str(v), "failed")
            return entry
        entry = ModelEntry(name, model_dir, cfg, on_disk=on_disk)
        selected = cfg.version_policy.select(on_disk)
        if not selected:
            entry.error = (
                f"no version folder selected by the version policy {cfg.version_policy} "
                f"(numeric folders on disk: {on_disk})"
            )
            log.error(
                "model %s: %s", name, entry.error, extra={"fields": {"event": "model_failed", "model": name}}
            )
        for v in selected:
            entry.versions[v] = ServedModel(
                name,
                v,
                model_dir / str(v) / MODEL_FILE,
                cfg,
                self.settings,
                self.metrics,
                self._state_changed,
            )
        return entry

    async def load_all(self) -> None:
        """Load every LOADING version in a worker thread; one failure never stops the others."""
        for entry in self._entries.values():
            for sm in entry.versions.values():
                if sm.state is ModelState.LOADING:
                    if not sm.path.is_file():
                        sm.fail(self._public(f"no {MODEL_FILE} in {sm.path.parent}"))
                        continue
                    await asyncio.to_thread(sm.load)
        self.loaded = True

    async def stop(self, grace: float | None = None) -> None:
        """Unload every version; queued requests get up to ``grace`` seconds."""
        await asyncio.gather(
            *(sm.unload(grace) for e in self._entries.values() for sm in e.versions.values())
        )

    def _public(self, reason: str) -> str:
        """A load failure reason as clients see it: paths relative to the repository, not the server's."""
        return reason.replace(str(self.root.resolve()) + "/", "").replace(str(self.root) + "/", "")

    def _state_changed(self, sm: ServedModel) -> None:
        self.metrics.set_model_state(sm.name, sm.version_label, sm.state.value, sm.provider)

    # ---- lookups ---------------------------------------------------------------------------------

    @property
    def any_ready(self) -> bool:
        return any(sm.ready for e in self._entries.values() for sm in e.versions.values())

    def entries(self) -> list[ModelEntry]:
        return list(self._entries.values())

    def knows(self, name: str) -> bool:
        return name in self._entries

    def entry(self, name: str, where: str = "model") -> ModelEntry:
        """The entry for a validated name; ModelNotFoundError naming what exists otherwise."""
        entry = self._entries.get(validate_model_name(name, where))
        if entry is None:
            known = sorted(self._entries)
            shown = ", ".join(known[:20]) + (", ..." if len(known) > 20 else "")
            raise ModelNotFoundError(f"{where}: no model named {name!r}; the repository has [{shown}]")
        return entry

    def resolve(self, name: str, version: int = 0, where: str = "model") -> ServedModel:
        """The version to run: ``version`` when given (> 0), else the latest ready one.

        Raises InvalidInputError (malformed), ModelNotFoundError (unknown model/version), ModelNotReadyError.
        """
        entry = self.entry(name, where)
        if version < 0:
            raise InvalidInputError(
                f"version: expected a positive version or 0 for the latest, got {version}"
            )
        if version:
            sm = entry.versions.get(version)
            if sm is None:
                served = sorted(entry.versions)
                raise ModelNotFoundError(
                    f"model {name!r} has no version {version}; served versions: {served}"
                )
            if not sm.ready:
                raise ModelNotReadyError(
                    f"model {name!r} version {version} is {sm.state.value}"
                    + (f": {sm.reason}" if sm.reason else "")
                )
            return sm
        sm = entry.latest_ready()
        if sm is None:
            raise ModelNotReadyError(f"model {name!r} has no ready version: {entry.describe_failure()}")
        return sm
