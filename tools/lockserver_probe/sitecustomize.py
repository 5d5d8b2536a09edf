"""The probe of ``tools/lockserver_memory.py``: imported by every Python process started with this directory on
PYTHONPATH, it does something only where DLS_PROBE_DIR is set (the service that tool starts).

It marks points of each lock server's life, writing the process's private memory (USS: Private_Clean +
Private_Dirty of smaps_rollup, kB) at each into ``DLS_PROBE_DIR/marks-PID.txt`` once its client is served
(its second InfoPut, as a ``dls_client.Client`` says Hello, InfoPut, Lock, InfoPut):

- ``atfork0``, ``atfork_last``: in the child, from the first and the last at-fork handler registered (the
  first by this module, before the listener imports threading, logging and random; the last at the end of the
  listener's set-up): the interpreter's own after-fork work, then the Python handlers';
- ``fork``: the first line of the child's life (``Daemon._child_life``);
- ``first``: ``Listener._serve``, after the child dropped the listener's resources;
- ``made0``, ``made``: around ``LockServer.__init__`` (its pid file written before);
- ``prehello``, ``welcomed``: around the greeting; ``info1``, ``locked``, ``info2``: after those requests.

DLS_PROBE_PAUSE (seconds) makes the listener sleep right after each fork, so that what the child marks until
then is its own work only (a page the listener writes after the fork is the child's alone too).
DLS_PROBE_CALLS makes each lock server note every function it calls from ``first`` to served and write, per
module, how many distinct pages its called functions and code objects are on (``calls-PID.txt``): the pages
its reference counts copy.

Reading smaps_rollup allocates a little: the figures are each a few pages above a lock server's without the
probe. A diagnostic, never installed: nothing of it runs unless the tool sets DLS_PROBE_DIR.
"""

from __future__ import annotations

import os
import sys

_DIR = os.environ.get("DLS_PROBE_DIR")
_CALLS = bool(os.environ.get("DLS_PROBE_CALLS"))
_PAUSE = float(os.environ.get("DLS_PROBE_PAUSE") or 0)

if _DIR:
    import importlib.abc
    import importlib.machinery
    from collections.abc import Callable
    from types import FrameType, ModuleType
    from typing import Any, ClassVar

    _marks: list[tuple[str, int]] = []
    _listener = [False]
    _codes: dict[int, Any] = {}
    _cfuncs: dict[int, Any] = {}

    def _uss() -> int:
        with open("/proc/self/smaps_rollup", "rb") as f:
            data = f.read()
        return sum(int(line.split()[1]) for line in data.split(b"\n")
                   if line.startswith((b"Private_Clean", b"Private_Dirty")))

    def mark(name: str) -> None:
        _marks.append((name, _uss()))

    def _in_lock_server(name: str) -> Callable[[], None]:
        def after_fork() -> None:
            if _listener[0]:
                mark(name)
        return after_fork

    os.register_at_fork(after_in_child=_in_lock_server("atfork0"))

    def _profile(frame: FrameType, event: str, arg: Any) -> None:
        if event == "call":
            _codes[id(frame.f_code)] = frame.f_code
        elif event == "c_call":
            _cfuncs[id(arg)] = arg

    def _pages_by_module() -> list[str]:
        """The distinct pages of the functions called (their function and code objects), by module."""
        import gc
        from collections import Counter, defaultdict

        sys.setprofile(None)
        gc.unfreeze()
        modules: defaultdict[int, set[str]] = defaultdict(set)
        for obj in gc.get_objects():
            if type(obj).__name__ == "function" and id(obj.__code__) in _codes:
                modules[id(obj) & ~4095].add(obj.__code__.co_filename.rsplit("/", 1)[-1])
        for code in _codes.values():
            modules[id(code) & ~4095].add(code.co_filename.rsplit("/", 1)[-1])
        for func in _cfuncs.values():
            owner = getattr(func, "__module__", None) or type(getattr(func, "__self__", None)).__name__
            modules[id(func) & ~4095].add(f"C {owner}")
        share: Counter[str] = Counter()
        for names in modules.values():
            for name in names:
                share[name] += 1 / len(names)
        called: defaultdict[str, list[str]] = defaultdict(list)
        for code in _codes.values():
            called[code.co_filename.rsplit("/", 1)[-1]].append(code.co_qualname)
        lines = [f"{len(modules)} pages hold the {len(_codes)} Python and {len(_cfuncs)} C functions called"]
        lines += [f"{pages:6.1f} {name}: {' '.join(sorted(called.get(name, [])))}"
                  for name, pages in share.most_common()]
        return lines

    def _served() -> None:
        with open(os.path.join(_DIR, f"marks-{os.getpid()}.txt"), "w", encoding="ascii") as out:
            out.write(" ".join(f"{name}={kb}" for name, kb in _marks) + "\n")
        if _CALLS:
            lines = _pages_by_module()
            with open(os.path.join(_DIR, f"calls-{os.getpid()}.txt"), "w", encoding="utf-8") as out:
                out.write("\n".join(lines) + "\n")

    def _around(cls: type, name: str, before: str | None, after: str | None) -> None:
        original = getattr(cls, name)

        def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
            if before:
                mark(before)
            result = original(self, *args, **kwargs)
            if after:
                mark(after)
            return result
        setattr(cls, name, wrapper)

    def _lifecycle(module: ModuleType) -> None:
        original = module.Daemon._child_life

        def child_life(self: Any, what: str, blocked: Any, child: Any) -> Any:
            if self.role == "listener":
                mark("fork")
            return original(self, what, blocked, child)
        module.Daemon._child_life = child_life

    def _listener_module(module: ModuleType) -> None:
        cls = module.Listener
        setup, serve = cls.setup, cls._serve

        def setup_then_watch(self: Any, report: Any) -> Any:
            said = setup(self, report)
            os.register_at_fork(after_in_child=_in_lock_server("atfork_last"))
            if _PAUSE:
                import time
                os.register_at_fork(after_in_parent=lambda: time.sleep(_PAUSE))
            _listener[0] = True
            return said

        def marked_serve(self: Any, conn: Any, peer: Any) -> Any:
            if _CALLS:
                sys.setprofile(_profile)
            mark("first")
            return serve(self, conn, peer)
        cls.setup, cls._serve = setup_then_watch, marked_serve

    def _lockserver(module: ModuleType) -> None:
        cls = module.LockServer
        _around(cls, "__init__", "made0", "made")
        _around(cls, "_greet", "prehello", "welcomed")
        _around(cls, "_lock", None, "locked")
        info_put = cls._info_put

        def marked_info_put(self: Any, req: Any) -> None:
            info_put(self, req)
            mark(f"info{self.stats.info_updates}")
            if self.stats.info_updates == 2:
                _served()
        cls._info_put = marked_info_put

    class _Patcher(importlib.abc.MetaPathFinder):
        """Patches each module above right after it is imported."""

        patches: ClassVar[dict[str, Callable[[ModuleType], None]]] = {
            "dls_daemon.lifecycle": _lifecycle, "dls_daemon.listener": _listener_module,
            "dls_daemon.lockserver": _lockserver,
        }

        def find_spec(self, name: str, path: Any, target: Any = None) -> Any:
            patch = self.patches.get(name)
            if patch is None:
                return None
            spec = importlib.machinery.PathFinder.find_spec(name, path)
            if spec is None or spec.loader is None:
                return spec
            execute = spec.loader.exec_module

            def exec_module(module: ModuleType) -> None:
                execute(module)
                patch(module)
            spec.loader.exec_module = exec_module  # type: ignore[method-assign]
            return spec

    sys.meta_path.insert(0, _Patcher())
