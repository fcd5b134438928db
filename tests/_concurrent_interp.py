"""Run a Triton kernel's programs *concurrently* in the CPU interpreter (one thread per program).

Triton's interpreter runs the programs of a grid one after another, so a kernel whose programs wait
for each other (the single-pass forward's row barrier) would spin forever there. This context manager
replaces the interpreter's grid loop with one thread per program, each with its own
``tl.program_id``: the waits, the atomics (real C++ atomics on the tensors' memory) and the memory
ordering between programs then execute as they would on a GPU whose programs are all resident.
A program that has not finished within ``timeout`` seconds is reported as a deadlock, and the
spinning threads are stopped (their next atomic raises).

It relies on the interpreter's private helpers (Triton 3.8's ``triton.runtime.interpreter``); the
tests that use it run only in the interpreter.
"""

from __future__ import annotations

import contextlib
import inspect
import threading


class Deadlock(RuntimeError):
    pass


@contextlib.contextmanager
def concurrent_programs(timeout: float = 120.0, max_resident: int | None = None, order=None):
    """``max_resident``: at most this many programs run at once (the rest start as others finish),
    like a GPU that cannot hold the whole grid (an MPS cap); default: all of them. ``order``: instead of
    threads, run the programs one after another in ``order(indices)`` (a permutation of the grid's
    ``(x, y, z)`` indices, which come in the interpreter's own order): a schedule in which, say, the
    first program of a group is the last to arrive (kernels whose programs never wait only)."""
    from triton.runtime import interpreter as I

    builder = I.interpreter_builder
    local = threading.local()
    abort = threading.Event()
    slots = threading.BoundedSemaphore(max_resident) if max_resident else None
    base_cls = type(builder)

    class _ThreadLocalGrid(base_cls):
        @property
        def grid_idx(self):
            return getattr(local, "idx", None)

        @grid_idx.setter
        def grid_idx(self, value):
            local.idx = value

        def create_atomic_rmw(self, *args, **kwargs):
            if abort.is_set():
                raise Deadlock("stopped: another program of this grid timed out")
            return super().create_atomic_rmw(*args, **kwargs)

        def create_atomic_cas(self, *args, **kwargs):
            if abort.is_set():
                raise Deadlock("stopped: another program of this grid timed out")
            return super().create_atomic_cas(*args, **kwargs)

    def call(self, *args_dev, **kwargs):
        argspec = inspect.getfullargspec(self.fn)
        kwargs = {k: v for k, v in kwargs.items() if k in argspec.args}
        args_hst, kwargs_hst = self._init_args_hst(args_dev, kwargs)
        for hook in self.pre_run_hooks:
            hook(*args_hst, **kwargs_hst)
        patch_scope = I._patch_lang(self.fn)
        try:
            args = inspect.getcallargs(self.fn, *args_hst, **kwargs_hst)
            args = {name: arg if name in self.constexprs else I._implicit_cvt(arg) for name, arg in args.items()}
            grid = self.grid(args) if callable(self.grid) else self.grid
            grid = tuple(grid) + (1,) * (3 - len(grid))
            builder.set_grid_dim(*grid)
            errors: list[BaseException] = []

            def program(idx):
                if slots is not None:
                    slots.acquire()
                try:
                    builder.set_grid_idx(*idx)
                    self.fn(**args)
                except BaseException as e:  # noqa: BLE001 - reported to the caller below
                    errors.append(e)
                finally:
                    if slots is not None:
                        slots.release()

            indices = [(x, y, z) for x in range(grid[0]) for y in range(grid[1]) for z in range(grid[2])]
            if order is not None:
                permuted = list(order(list(indices)))
                assert sorted(permuted) == indices, "order must return a permutation of the grid's indices"
                for idx in permuted:
                    program(idx)
            else:
                threads = [threading.Thread(target=program, args=(idx,), daemon=True) for idx in indices]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join(timeout)
                    if t.is_alive():
                        abort.set()
                        for u in threads:
                            u.join(30)
                        raise Deadlock(f"programs of a grid {grid} still running after {timeout} s")
            if errors:
                raise errors[0]
        finally:
            patch_scope.restore()
        self._restore_args_dev(args_dev, args_hst, kwargs, kwargs_hst)

    orig_call = I.GridExecutor.__call__
    builder.__class__ = _ThreadLocalGrid
    I.GridExecutor.__call__ = call
    try:
        yield
    finally:
        I.GridExecutor.__call__ = orig_call
        builder.__class__ = base_cls
