"""The fair executor and the per-user bounds of speech work, alone (no engines, no server)."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest

from prismd.config import VoiceSettings
from prismd.voice.errors import Cancelled, SpeechBusy
from prismd.voice.scheduler import FairExecutor, SpeechLimits

from .waiting import until


async def held(executor: FairExecutor) -> tuple[threading.Event, asyncio.Future[Any]]:
    """Keep the worker busy until the returned event is set."""
    gate = threading.Event()
    running = executor.submit("someone", gate.wait, 10)
    await until(lambda: executor.running is not None, "the worker to take the work", 10)
    return gate, running


def test_a_user_with_little_work_goes_before_the_queued_work_of_another():
    """Start-time fair queueing by seconds of audio: bob's short clips are served right after
    the job that runs, not after alice's queue."""

    async def main() -> list[str]:
        executor = FairExecutor("test")
        order: list[str] = []
        try:
            gate, running = await held(executor)
            jobs = [executor.submit("alice", order.append, f"alice{i}", cost=10) for i in range(4)]
            jobs += [executor.submit("bob", order.append, f"bob{i}", cost=3) for i in range(2)]
            gate.set()
            await asyncio.gather(running, *jobs)
        finally:
            executor.close()
        return order

    order = asyncio.run(main())
    assert order == ["alice0", "bob0", "bob1", "alice1", "alice2", "alice3"]


def test_one_users_jobs_run_in_order_and_an_idle_user_is_not_penalised():
    async def main() -> list[str]:
        executor = FairExecutor("test")
        order: list[str] = []
        try:
            # alice used the worker a lot, then it went idle: that history is forgotten.
            await executor.submit("alice", order.append, "x", cost=50)
            order.clear()
            gate, running = await held(executor)
            jobs = [executor.submit("bob", order.append, f"bob{i}") for i in range(3)]
            jobs.append(executor.submit("alice", order.append, "alice0"))
            gate.set()
            await asyncio.gather(running, *jobs)
        finally:
            executor.close()
        return order

    assert asyncio.run(main()) == ["bob0", "alice0", "bob1", "bob2"]


def test_cancelled_jobs_leave_the_queue_and_never_run():
    async def main() -> tuple[list[str], dict[str, Any], float]:
        executor = FairExecutor("test")
        ran: list[str] = []
        try:
            gate, running = await held(executor)
            doomed = [executor.submit("alice", ran.append, f"a{i}", cost=5) for i in range(3)]
            kept = executor.submit("bob", ran.append, "b0", cost=5)
            assert executor.queued_cost("alice") == 15
            for job in doomed:
                executor.cancel(job)
            assert executor.queued_cost("alice") == 0  # at once, not when the worker gets there
            gate.set()
            await asyncio.gather(running, kept)
            status = executor.status()
        finally:
            executor.close()
        return ran, status, executor.queued_cost("bob")

    ran, status, left = asyncio.run(main())
    assert ran == ["b0"]
    assert status["cancelled"] == 3 and status["queued"] == 0 and status["done"] == 2
    assert left == 0


def test_a_failing_job_reaches_its_caller_and_the_worker_goes_on():
    async def main() -> str:
        executor = FairExecutor("test")
        try:
            with pytest.raises(ZeroDivisionError):
                await executor.run("alice", lambda: 1 / 0)
            result: str = await executor.run("alice", str.upper, "still here")
            return result
        finally:
            executor.close()

    assert asyncio.run(main()) == "STILL HERE"


def test_requests_in_progress_are_bounded_per_user_and_kind():
    async def main() -> None:
        executor = FairExecutor("stt")
        limits = SpeechLimits(executor, VoiceSettings(max_user_transcriptions=2))
        try:
            first = limits.open("alice", "recording")
            limits.open("alice", "recording")
            with pytest.raises(SpeechBusy, match="2 recordings, transcriptions or hands-free"):
                limits.open("alice", "recording")
            limits.open("bob", "recording")  # another user is not affected
            limits.open("alice", "speak", "tts")  # nor another kind of work
            first.close()
            limits.open("alice", "recording")
            first.close()  # twice is harmless
            assert limits.status()["requests"] == 4
        finally:
            executor.close()

    asyncio.run(main())


def test_queued_seconds_are_bounded_per_user():
    async def main() -> None:
        executor = FairExecutor("stt")
        limits = SpeechLimits(executor, VoiceSettings(max_user_queued_s=30))
        try:
            gate, running = await held(executor)
            alice = limits.open("alice", "transcription")
            job = alice.submit(executor, len, "x", cost=25)
            with pytest.raises(SpeechBusy, match="voice.max_user_queued_s"):
                limits.check_queue(alice, 10)
            limits.check_queue(limits.open("bob", "transcription"), 10)
            alice.cancel()  # alice leaves: her queued work goes, and with it the bound
            assert job.cancelled()
            limits.check_queue(limits.open("alice", "transcription"), 10)
            with pytest.raises(Cancelled):
                alice.submit(executor, len, "x")
            gate.set()
            await running
        finally:
            executor.close()

    asyncio.run(main())


def test_recorded_audio_is_bounded_per_user_and_in_total():
    async def main() -> None:
        executor = FairExecutor("stt")
        settings = VoiceSettings(
            max_user_audio_bytes=1000 * 1024, max_buffered_audio_bytes=1500 * 1024
        )
        limits = SpeechLimits(executor, settings)
        try:
            alice = limits.open("alice", "recording")
            limits.hold(alice, 800 * 1024)
            with pytest.raises(SpeechBusy, match="voice.max_user_audio_bytes"):
                limits.hold(limits.open("alice", "recording"), 300 * 1024)
            bob = limits.open("bob", "recording")
            limits.hold(bob, 600 * 1024)
            carol = limits.open("carol", "recording")
            with pytest.raises(SpeechBusy, match="voice.max_buffered_audio_bytes"):
                limits.hold(carol, 200 * 1024)
            assert limits.status()["bufferedAudioBytes"] == 1400 * 1024
            alice.close()  # her recording ended: its bytes are free
            limits.hold(carol, 200 * 1024)
            assert limits.status()["bufferedAudioBytes"] == 800 * 1024
        finally:
            executor.close()

    asyncio.run(main())
