"""The learned detector over the real broker and the real service.

A model is trained on generated traffic (detectors/traffic.py) and loaded by a detector
through ``KS_DETECTOR_MODEL`` (``detector_model``). One generated agent's benign history
is replayed first (its own behaviour warms up the features), then tasks opened on the real
service carry replayed calls of that agent:

* an in-scope exfiltration (same source, bytes out x300, no limit declared so no rule
  fires) raises a ``model.anomaly`` alert with its score and features, and no revocation;
* the same with x1000 from a source the agent never used (a deterministic signal) is
  revoked (``model.anomaly_confirmed``);
* the benign history and an unmodified benign task raise nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import replace
from pathlib import Path

import msgspec
import pytest
import pytest_asyncio

from detectors.consumer import Detector
from detectors.models import MODEL_ALERT, MODEL_REVOKE
from detectors.traffic import Traffic, generate
from detectors.train import train
from service.contracts import TaskView
from service.kernel.events import Source, TaskEvent, TaskEventKind, UsageEvent, encoder
from tests.detectors.rig import Rig, Task, wait_for
from tests.support.harness import basic

pytestmark = [pytest.mark.tansu, pytest.mark.asyncio(loop_scope="module")]

AGENT_TYPE = "researcher"


@pytest.fixture(scope="module")
def traffic() -> Traffic:
    return generate(seed=21, tasks=1500, attack_rate=0.06)


@pytest.fixture(scope="module")
def model_path(traffic: Traffic, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train(traffic).save(tmp_path_factory.mktemp("model") / "model.ksm")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def model_detector(rig: Rig, model_path: Path) -> AsyncIterator[Detector]:
    settings = replace(rig.settings, detector_model=str(model_path))
    det = Detector(settings, service_url=rig.service_url, token=rig.detector_token)
    assert det.model is not None
    stop, ready = asyncio.Event(), asyncio.Event()
    running = asyncio.create_task(det.run(stop, ready))
    waiting = asyncio.create_task(ready.wait())
    done, _ = await asyncio.wait({running, waiting}, timeout=30, return_when="FIRST_COMPLETED")
    if running in done:
        running.result()
    assert waiting in done, "detector not ready within 30 s"
    yield det
    stop.set()
    with contextlib.suppress(asyncio.CancelledError):
        await asyncio.wait_for(running, timeout=20)


class Replay:
    """One generated agent, renamed to a fresh id of the same type, replayed from now on."""

    def __init__(self, traffic: Traffic) -> None:
        self.traffic = traffic
        benign = [t for t in traffic.tasks if traffic.labels[t.task_id].scenario is None]
        agent = max(
            {t.agent_id for t in benign if t.agent_id.startswith(AGENT_TYPE)},
            key=lambda a: sum(t.agent_id == a for t in benign),
        )
        self.tasks = [t for t in benign if t.agent_id == agent]
        self.by_task = traffic.by_task()
        self.agent_id = f"{AGENT_TYPE}-{secrets.token_hex(4)}"
        self.shift = 0.0
        self.secret = ""

    def events(self, task: TaskEvent) -> list[UsageEvent]:
        return [self.traffic.events[i] for i in self.by_task[task.task_id]]

    async def history(self, rig: Rig, detector: Detector, n_tasks: int) -> list[str]:
        """Publish ``n_tasks`` benign tasks of the agent (facts + usage), ending about now."""
        tasks = self.tasks[:n_tasks]
        last = max(e.at for t in tasks for e in self.events(t))
        self.shift = time.time() - 2.0 - last
        for t in tasks:
            opened = msgspec.structs.replace(
                t,
                at=t.at + self.shift,
                deadline=(t.deadline or 0) + self.shift,
                agent_id=self.agent_id,
                task_id=f"h-{t.task_id}",
            )
            await rig.producer.send_and_wait(
                rig.settings.kafka_tasks_topic,
                encoder.encode(opened),
                key=opened.task_id.encode(),
            )
        ids = [f"h-{t.task_id}" for t in tasks]
        await wait_for(
            lambda: all(i in detector.store.tasks for i in ids), what="history tasks known"
        )
        events = sorted(
            (
                msgspec.structs.replace(
                    e, at=e.at + self.shift, agent_id=self.agent_id, task_id=f"h-{e.task_id}"
                )
                for t in tasks
                for e in self.events(t)
            ),
            key=lambda e: e.at,
        )
        await rig.produce(*events)
        return ids

    async def open_real_task(self, rig: Rig, detector: Detector, template: TaskEvent) -> Task:
        """A task on the real service for the renamed agent, with the template's grants
        and audiences and no declared limits (so no limit rule can fire)."""
        assert template.scope is not None
        grants, audiences = list(template.scope.grants), list(template.scope.audiences)
        if not self.secret:
            r = await rig.http.post(
                "/v1/agents",
                json={"id": self.agent_id, "ceiling": {"grants": grants, "audiences": audiences}},
            )
            assert r.status_code == 201, r.text
            self.secret = r.json()["client_secret"]
        r = await rig.http.post(
            "/v1/tasks",
            json={"scope": {"grants": grants, "audiences": audiences, "limits": {}}, "ttl": 600},
            headers=basic(self.agent_id, self.secret),
        )
        assert r.status_code == 201, r.text
        body = r.json()
        view = msgspec.convert(body["task"], TaskView)
        task = Task(self.agent_id, view.id, body["jti"], view, view.deadline)
        await rig.publish_task(task, TaskEventKind.OPENED, "active")
        await rig.known(detector, task)
        return task

    def onto(
        self,
        task: Task,
        template: TaskEvent,
        *,
        bytes_factor: int = 1,
        source: Source | None = None,
    ) -> list[UsageEvent]:
        """The template's calls as calls of ``task``, starting now; from the third call
        on, bytes out multiplied by ``bytes_factor``."""
        events = self.events(template)
        t0 = time.time() + 0.5 - events[0].at
        return [
            msgspec.structs.replace(
                e,
                event_id=f"{task.task_id}-{k}",
                at=e.at + t0,
                agent_id=task.agent_id,
                task_id=task.task_id,
                jti_hash=task.jti_hash,
                bytes_out=e.bytes_out * (bytes_factor if k >= 2 else 1),
                source=source or e.source,
            )
            for k, e in enumerate(events)
        ]


async def _settle(rig: Rig, detector: Detector, events: Sequence[UsageEvent]) -> None:
    await rig.processed(detector, await rig.produce(*events))


async def test_model_alerts_revokes_and_leaves_benign_alone(
    rig: Rig, model_detector: Detector, traffic: Traffic
) -> None:
    replay = Replay(traffic)
    history = await replay.history(rig, model_detector, n_tasks=10)
    templates = replay.tasks[10:13]
    assert len(templates) == 3

    # Benign: an unmodified task of the same agent on the real service.
    benign = await replay.open_real_task(rig, model_detector, templates[0])
    await _settle(rig, model_detector, replay.onto(benign, templates[0]))

    # In-scope exfiltration, usual source: the model alerts (no deterministic signal).
    exfil = await replay.open_real_task(rig, model_detector, templates[1])
    await _settle(rig, model_detector, replay.onto(exfil, templates[1], bytes_factor=300))
    alert = await rig.alert(exfil, MODEL_ALERT.id)
    assert alert.action == "alert"
    assert alert.score is not None
    assert alert.score >= alert.evidence["alert_level"]
    assert alert.evidence["score"] == alert.score
    names = [f["name"] for f in alert.evidence["features"]]
    assert {"bytes_out_log", "bytes_out_z", "task_bytes_log", "bytes_excess"} & set(names[:2]), (
        names
    )
    assert alert.evidence["model"]["id"] == model_detector.model.artifact.model_id  # type: ignore[union-attr]
    assert alert.evidence["agent_type"] == AGENT_TYPE
    assert await rig.revocations_of(exfil.task_id) == []
    assert await rig.task_status(exfil.task_id) == "active"

    # High confidence + a deterministic signal (a source this agent never used): revoked.
    stolen = await replay.open_real_task(rig, model_detector, templates[2])
    attacker = Source(address="203.0.113.9", user_agent="curl/8.5")
    await rig.produce(*replay.onto(stolen, templates[2], bytes_factor=1000, source=attacker))
    revoked = await rig.alert(stolen, MODEL_REVOKE.id)
    assert revoked.action == "revoke"
    assert revoked.evidence["revocation"] in ("revoked", "existing"), revoked.evidence
    assert "first_seen_source" in revoked.evidence["corroborated_by"]
    assert revoked.score is not None
    assert revoked.score >= revoked.evidence["revoke_level"]
    revocations = await rig.revocations_of(stolen.task_id)
    assert len(revocations) == 1
    assert revocations[0]["reason"].startswith(f"{MODEL_REVOKE.id}: ")
    assert await rig.task_status(stolen.task_id) == "revoked"

    # Benign traffic of the same run raised nothing.
    assert rig.alerts_of(benign) == []
    assert await rig.task_status(benign.task_id) == "active"
    assert [a for a in rig.alerts if a.task_id in set(history)] == []
