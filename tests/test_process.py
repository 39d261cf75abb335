"""The lifecycle helpers of process.py: a reload that fails in a way nobody
foresaw does not end SIGHUP handling, and a background task's error is logged."""

from __future__ import annotations

import asyncio
import logging
import os
import signal

import pytest

from palpo_gate import process


async def test_reload_loop_survives_an_unexpected_error(caplog: pytest.LogCaptureFixture) -> None:
    requested = asyncio.Event()
    calls: list[int] = []
    first, done = asyncio.Event(), asyncio.Event()

    async def reload() -> None:
        calls.append(len(calls))
        if len(calls) == 1:
            first.set()
            raise RuntimeError("boom")
        done.set()

    task = process.start_task(process.reload_loop(requested, reload), "test reload")
    try:
        requested.set()
        async with asyncio.timeout(10):
            await first.wait()
        await asyncio.sleep(0)  # the loop logs the error and waits again
        requested.set()  # the second SIGHUP is still handled
        async with asyncio.timeout(10):
            await done.wait()
        assert calls == [0, 1]
        assert not task.done()
        assert "reload failed unexpectedly" in caplog.text
        assert "boom" in caplog.text
    finally:
        await process.cancel(task)


async def test_start_task_logs_an_error_and_drops_its_reference(
        caplog: pytest.LogCaptureFixture) -> None:
    async def fail() -> None:
        raise ValueError("lost")

    task = process.start_task(fail(), "failing task")
    assert task in process._tasks
    with pytest.raises(ValueError):
        await task
    await asyncio.sleep(0)  # done callbacks run on the next loop turn
    assert task not in process._tasks
    assert task.get_name() == "failing task"
    assert any(r.levelno == logging.ERROR and "failing task" in r.getMessage()
               for r in caplog.records)


async def test_signals_set_their_events() -> None:
    signals = process.Signals()
    signals.install()
    try:
        os.kill(os.getpid(), signal.SIGHUP)
        async with asyncio.timeout(10):
            await signals.reload.wait()
        assert not signals.stop.is_set()
    finally:
        signals.remove()


def test_worker_role_is_read_from_the_environment() -> None:
    assert process.Worker.from_env({}) is None
    worker = process.Worker.from_env({process.ENV_WORKER: "3", process.ENV_REPORT_FD: "9",
                                      process.ENV_METRICS_DIR: "/m", process.ENV_FDS: ""})
    assert worker == process.Worker("3", 9, "/m", "")
    assert worker.sockets() == {}
