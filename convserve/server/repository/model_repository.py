"""The model repository: scan ``<root>/<model>/<version>/model.onnx``, apply version policies, track states.

Request-supplied names and versions are looked up in dictionaries built from the scan; they are
validated first and never joined onto a filesystem path.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

from convserve.common.model_config import MODEL_FILE, NAME_PATTERN, ModelConfig, ModelConfigError

from ..errors import ConvserveServerError, InvalidInputError, ModelNotFoundError, ModelNotReadyError
from ..observability.metrics import Metrics
from ..runtime.served_model import ModelState, ServedModel
from ..settings import Settings
from .config_source import CONFIG_FILES, read_model_config
from .model_files import Boundary, ModelFileError

log = logging.getLogger(__name__)

_VERSION_DIR = re.compile(r"[0-9]{1,18}")  # fullmatch only, like NAME_PATTERN

Stamp = tuple[int, int] | None

# Told of each model-control request this repository applied: ("load" | "unload", model, version).
ControlListener = Callable[[str, str, int], Awaitable[None]]


def _stamp(path: Path) -> Stamp:
    """(mtime_ns, size) of a file, None when missing: cheap change detection that reads nothing."""
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size)


def _version_folders(model_dir: Path) -> list[int]:
    return sorted(int(p.name) for p in model_dir.iterdir() if p.is_dir() and _VERSION_DIR.fullmatch(p.name))


def model_fingerprint(model_dir: Path, model_file: str = MODEL_FILE) -> tuple[object, ...]:
    """What repository polling compares between passes: the config files' and each version's graph's stamps
    (``model_file``: the config's default_model_filename)."""
    try:
        versions = _version_folders(model_dir)
    except OSError:
        return ()
    return (
        *(_stamp(model_dir / name) for name in CONFIG_FILES),
        *((v, _stamp(model_dir / str(v) / model_file)) for v in versions),
    )


def _model_file(entry: ModelEntry | None) -> str:
    """The graph file name polling stamps for an entry: its config's, else the default."""
    return entry.config.default_model_filename if entry is not None and entry.config else MODEL_FILE


@dataclass
class ModelEntry:
    """One model folder: its config (None when unreadable), the reason it is broken, its served versions."""

    name: str
    path: Path
    config: ModelConfig | None
    error: str = ""
    versions: dict[int, ServedModel] = field(default_factory=dict)
    on_disk: list[int] = field(default_factory=list)
    # What hot reload compares: the folder's file stamps when last (re)loaded, each served version's stamp.
    fingerprint: tuple[object, ...] = ()
    stamps: dict[int, Stamp] = field(default_factory=dict)
    held: bool = False  # unloaded by request: polling leaves it alone until LoadModel

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
    if not NAME_PATTERN.fullmatch(name):
        shown = name if len(name) <= 80 else name[:77] + "..."
        raise InvalidInputError(
            f"{where}: expected a model name matching {NAME_PATTERN.pattern}, got {shown!r}"
        )
    return name


def parse_version(text: str, where: str = "model_version") -> int:
    """A v2 version string → int; "" means latest (0)."""
    if text == "":
        return 0
    if not _VERSION_DIR.fullmatch(text):
        shown = text if len(text) <= 40 else text[:37] + "..."
        raise InvalidInputError(
            f"{where}: expected a positive integer version or empty for the latest, got {shown!r}"
        )
    return int(text)


class RepositoryUnavailableError(RuntimeError):
    """The model repository is missing or unreadable at start."""


def check_root(root: str | os.PathLike[str]) -> None:
    """Raise RepositoryUnavailableError when ``root`` is not a folder this process can list."""
    try:
        os.listdir(root)
    except OSError as exc:
        raise RepositoryUnavailableError(
            f"model repository {root}: {exc.strerror or exc} (--wait-for-repository starts anyway "
            "and serves what repository polling finds later)"
        ) from None


class ModelRepository:
    """Every model found at start, each with the versions its policy selects, in a known state."""

    def __init__(self, root: str | Path, settings: Settings, metrics: Metrics) -> None:
        self.root = Path(root)
        self.settings = settings
        self.metrics = metrics
        self.boundary = Boundary(settings.allow_external_symlinks, self.root)
        self._entries: dict[str, ModelEntry] = {}
        self.loaded = False
        self._lock = asyncio.Lock()  # one load / reload / unload at a time
        # Called after every load, reload and unload (the server's readiness follows the models).
        self.on_change: Callable[[], Awaitable[None]] | None = None
        self._settling: dict[
            str, tuple[object, ...]
        ] = {}  # polling: changes seen once, awaiting a second look
        # Worker processes: passes each model-control request on to the sibling workers (processes/worker.py).
        self.on_control: ControlListener | None = None

    # ---- scanning and loading --------------------------------------------------------------------

    def check_root(self) -> None:
        """Raise RepositoryUnavailableError when the repository is not a folder this process can list."""
        check_root(self.root)

    def scan(self) -> None:
        """Read every model's config and register its selected versions as LOADING (fast, no ONNX)."""
        if not self.root.is_dir():
            log.error("model repository %s does not exist or is not a folder; serving no models", self.root)
            return
        for model_dir in sorted(p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith(".")):
            name = model_dir.name
            if not NAME_PATTERN.fullmatch(name):
                log.warning(
                    "skipping %s: folder name is not a valid model name (%s)", model_dir, NAME_PATTERN.pattern
                )
                continue
            self._entries[name] = self._scan_model(model_dir)

    def _read_config(self, model_dir: Path) -> ModelConfig:
        """The model's config from whichever source defines it; every file it reads stays in the folder."""
        self.boundary.check(model_dir, self.root, "model folder")
        return read_model_config(model_dir, self.boundary)

    def _unservable(self, path: Path) -> str:
        """Why a version's model file cannot be loaded (missing, or outside its model folder), else ""."""
        if not path.is_file():
            return self._public(f"no {path.name} in {path.parent}")
        try:
            self.boundary.check(path, path.parent.parent, "model file")
        except ModelFileError as exc:
            return self._public(str(exc))
        return ""

    def _scan_model(self, model_dir: Path) -> ModelEntry:
        name = model_dir.name
        on_disk = sorted(
            int(p.name) for p in model_dir.iterdir() if p.is_dir() and _VERSION_DIR.fullmatch(p.name)
        )
        try:
            cfg = self._read_config(model_dir)
        except ModelConfigError as exc:
            entry = ModelEntry(
                name,
                model_dir,
                None,
                error=self._public(f"config: {exc}"),
                on_disk=on_disk,
                fingerprint=model_fingerprint(model_dir),
            )
            log.error(
                "model %s: %s", name, entry.error, extra={"fields": {"event": "model_failed", "model": name}}
            )
            for v in on_disk:  # listed as failed so that /metrics and ListModels show why nothing serves
                self.metrics.set_model_state(name, str(v), "failed")
            return entry
        entry = ModelEntry(
            name, model_dir, cfg, on_disk=on_disk,
            fingerprint=model_fingerprint(model_dir, cfg.default_model_filename),
        )  # fmt: skip
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
            entry.stamps[v] = _stamp(model_dir / str(v) / cfg.default_model_filename)
            entry.versions[v] = ServedModel(
                name,
                v,
                model_dir / str(v) / cfg.default_model_filename,
                cfg,
                self.settings,
                self.metrics,
                self._state_changed,
            )
        return entry

    async def load_all(self) -> None:
        """Load every LOADING version in a worker thread; one failure never stops the others."""
        async with self._lock:
            for entry in list(self._entries.values()):
                for sm in list(entry.versions.values()):
                    if sm.state is ModelState.LOADING:
                        problem = self._unservable(sm.path)
                        if problem:
                            sm.fail(problem)
                            continue
                        await asyncio.to_thread(sm.load)
            self.loaded = True
        await self._changed()

    async def _changed(self) -> None:
        if self.on_change is not None:
            await self.on_change()

    async def stop(self, grace: float | None = None) -> None:
        """Unload every version; queued requests get up to ``grace`` seconds."""
        await asyncio.gather(
            *(sm.unload(grace) for e in self._entries.values() for sm in e.versions.values())
        )

    # ---- hot reload --------------------------------------------------------------------------------

    async def reload(self, name: str, where: str = "model", *, propagate: bool = True) -> ModelEntry:
        """(Re)read one model folder and serve what its version policy now selects, without a restart.

        New or changed versions load first (in a worker thread); versions no longer selected are retired
        afterwards, and their queued requests finish (up to ``drain_grace_seconds``). A version that fails
        to load never replaces a ready one: the ready one keeps serving and says why in its reason.
        Raises InvalidInputError (malformed name) or ModelNotFoundError (no such folder).
        """
        validate_model_name(name, where)
        async with self._lock:
            entry = await self._reload(name, where)
        await self._changed()
        if propagate and self.on_control is not None:
            await self.on_control("load", name, 0)
        return entry

    async def _reload(self, name: str, where: str) -> ModelEntry:
        model_dir = self.root / name  # a validated name: one path component, never "..", "/" or "%"
        old = self._entries.get(name)
        if not model_dir.is_dir():
            raise ModelNotFoundError(f"{where}: no model folder named {name!r} in the repository")
        fingerprint = model_fingerprint(model_dir, _model_file(old))
        on_disk = _version_folders(model_dir)
        try:
            cfg = await asyncio.to_thread(self._read_config, model_dir)
        except ModelConfigError as exc:
            if old is not None and old.latest_ready() is not None:
                for sm in old.versions.values():
                    if sm.ready:
                        sm.reason = self._public(
                            f"config.json reload failed ({exc}); kept the loaded version"
                        )
                old.fingerprint = fingerprint
                log.error("model %s: config reload failed, still serving the loaded versions: %s", name, exc)
                return old
            entry = ModelEntry(
                name,
                model_dir,
                None,
                error=self._public(f"config: {exc}"),
                on_disk=on_disk,
                fingerprint=fingerprint,
            )
            self._entries[name] = entry
            if old is not None:
                await self._retire(list(old.versions.values()))
            return entry
        if cfg.default_model_filename != _model_file(old):
            fingerprint = model_fingerprint(model_dir, cfg.default_model_filename)
        selected = cfg.version_policy.select(on_disk)
        versions: dict[int, ServedModel] = {}
        stamps: dict[int, tuple[int, int] | None] = {}
        failed: list[int] = []
        for v in selected:
            path = model_dir / str(v) / cfg.default_model_filename
            stamp = _stamp(path)
            current = old.versions.get(v) if old is not None else None
            if (
                current is not None
                and current.ready
                and old is not None
                and old.config == cfg
                and old.stamps.get(v) == stamp
            ):
                current.reason = ""
                versions[v], stamps[v] = current, stamp  # unchanged: keeps serving as it is
                continue
            candidate = ServedModel(name, v, path, cfg, self.settings, self.metrics)
            problem = self._unservable(path)
            if problem:
                candidate.fail(problem)
            else:
                await asyncio.to_thread(candidate.load)
            if candidate.ready:
                versions[v], stamps[v] = candidate, stamp
            elif current is not None and current.ready:
                current.reason = self._public(f"reload failed ({candidate.reason}); kept the loaded version")
                versions[v], stamps[v] = current, old.stamps.get(v) if old is not None else None
                failed.append(v)
            else:
                versions[v], stamps[v] = candidate, stamp
                failed.append(v)
        # A selected version that failed does not count: keep older ready versions serving in its place.
        ready = sum(sm.ready for sm in versions.values())
        if old is not None and ready < len(selected):
            for v, sm in sorted(old.versions.items(), reverse=True):
                if ready >= len(selected):
                    break
                if sm.ready and v not in versions:
                    sm.reason = f"kept serving: version(s) {failed} failed to load"
                    versions[v], stamps[v] = sm, old.stamps.get(v)
                    ready += 1
        entry = ModelEntry(
            name,
            model_dir,
            cfg,
            on_disk=on_disk,
            fingerprint=fingerprint,
            versions=dict(sorted(versions.items())),
            stamps=stamps,
        )
        if not selected:
            entry.error = (
                f"no version folder selected by the version policy {cfg.version_policy} "
                f"(numeric folders on disk: {on_disk})"
            )
        self._entries[name] = entry
        kept = {id(sm) for sm in versions.values()}
        if old is not None:
            await self._retire([sm for sm in old.versions.values() if id(sm) not in kept])
        for sm in entry.versions.values():  # the state gauge follows the versions now served
            sm.listen(self._state_changed)
        log.info(
            "model %s reloaded: versions %s",
            name,
            {v: sm.state.value for v, sm in entry.versions.items()},
            extra={"fields": {"event": "model_reloaded", "model": name}},
        )
        return entry

    async def _retire(self, versions: list[ServedModel]) -> None:
        """Unload versions no longer served; their queued requests get the drain grace period."""
        await asyncio.gather(*(sm.unload(self.settings.drain_grace_seconds) for sm in versions))

    async def unload(
        self, name: str, version: int = 0, where: str = "model", *, propagate: bool = True
    ) -> ModelEntry:
        """Stop serving one version (``version`` > 0) or the whole model; queued requests finish first.

        The model stays unloaded, by polling too, until ``reload`` is asked for it.
        """
        entry = self.entry(name, where)
        if version < 0:
            raise InvalidInputError(f"version: expected a positive version or 0 for all, got {version}")
        async with self._lock:
            targets = [sm for v, sm in entry.versions.items() if version in (0, v)]
            if version and not targets:
                raise ModelNotFoundError(
                    f"model {name!r} has no version {version}; served versions: {sorted(entry.versions)}"
                )
            for sm in targets:
                del entry.versions[sm.version]
            if not entry.versions:
                entry.held = True
                entry.error = "unloaded by a model-control request; LoadModel serves it again"
            await self._retire(targets)
        await self._changed()
        log.info(
            "model %s: unloaded version(s) %s by request",
            name,
            [sm.version for sm in targets],
            extra={"fields": {"event": "model_unloaded", "model": name}},
        )
        if propagate and self.on_control is not None:
            await self.on_control("unload", name, version)
        return entry

    async def poll(self) -> None:
        """One pass of repository polling: reload each model folder whose files changed and then held still
        for one more pass (so a file still being copied is not loaded half-written); new folders load,
        removed folders are unloaded. Models unloaded by request are left alone."""
        if not self.root.is_dir():
            return
        names = sorted(
            p.name
            for p in self.root.iterdir()
            if p.is_dir() and not p.name.startswith(".") and NAME_PATTERN.fullmatch(p.name)
        )
        for name in names:
            entry = self._entries.get(name)
            if entry is not None and entry.held:
                continue
            fingerprint = model_fingerprint(self.root / name, _model_file(entry))
            if entry is not None and fingerprint == entry.fingerprint:
                self._settling.pop(name, None)
                continue
            if self._settling.get(name) != fingerprint:
                self._settling[name] = fingerprint
                continue
            del self._settling[name]
            try:
                await self.reload(name, propagate=False)  # every worker polls the same folder itself
            except ConvserveServerError as exc:  # e.g. the folder vanished meanwhile; the others go on
                log.warning("model %s: reload skipped: %s", name, exc)
        for name in sorted(set(self._entries) - set(names)):
            async with self._lock:
                gone = self._entries.pop(name, None)
                if gone is None:
                    continue
                await self._retire(list(gone.versions.values()))
            await self._changed()
            log.info(
                "model %s: folder removed; unloaded",
                name,
                extra={"fields": {"event": "model_removed", "model": name}},
            )

    async def poll_forever(self, interval: float) -> None:
        """Poll every ``interval`` seconds once the initial load is done; errors are logged, never fatal."""
        while True:
            await asyncio.sleep(interval)
            if not self.loaded:
                continue
            try:
                await self.poll()
            except Exception:  # a poll that fails must not stop the next one
                log.exception("repository poll failed")

    def _public(self, reason: str) -> str:
        """A load failure reason as clients see it: paths relative to the repository, not the server's."""
        return reason.replace(str(self.root.resolve()) + "/", "").replace(str(self.root) + "/", "")

    def _state_changed(self, sm: ServedModel) -> None:
        self.metrics.set_model_state(sm.name, sm.version_label, sm.state.value, sm.provider)

    # ---- lookups ---------------------------------------------------------------------------------

    @property
    def any_ready(self) -> bool:
        return any(sm.ready for e in self._entries.values() for sm in e.versions.values())

    def not_ready(self) -> list[str]:
        """What keeps a strictly ready server from being ready: each model (not unloaded by request)
        whose config failed or that has a selected version not READY, with the reason."""
        return [
            f"{e.name}: {e.describe_failure()}"
            for e in self._entries.values()
            if not e.held and (e.error or any(not sm.ready for sm in e.versions.values()))
        ]

    def ready(self, strict: bool) -> bool:
        """The server's readiness: every model found ready (``strict``, Triton's default), else any."""
        if not self.loaded:
            return False
        return not self.not_ready() if strict else self.any_ready

    def entries(self) -> list[ModelEntry]:
        return list(self._entries.values())

    def knows(self, name: str) -> bool:
        return name in self._entries

    def entry(self, name: str, where: str = "model") -> ModelEntry:
        """The entry for a validated name; ModelNotFoundError naming what exists otherwise."""
        entry = self._entries.get(name)  # entries have valid names: only a miss needs validating
        if entry is None:
            validate_model_name(name, where)
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
