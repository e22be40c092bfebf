"""`deployments/trigger.py --wait` speaks while it waits: the flow run's state changes, its epoch lines as they
arrive, and the run's summary at the end (here a stand-in flow under the Prefect test server, watched from the
main thread while it runs in another)."""
from __future__ import annotations

import io
import threading
import time

import pytest
from prefect import flow


@flow(name="wait-watch-demo")
def demo_training() -> None:
    from prefect import get_run_logger
    from prefect.artifacts import create_markdown_artifact

    log = get_run_logger()
    for epoch in (1, 2):
        time.sleep(1.5)
        log.info("epoch %d/2 (%d%%): eval_f1=0.5", epoch, epoch * 50)
        log.info("chatter nobody waits for")
    create_markdown_artifact("# classify: demo version 1\n\n| | |\n|---|---|\n| Aliases | challenger |",
                             key="demo-summary")


@pytest.mark.usefixtures("prefect_harness")
def test_wait_prints_states_epochs_and_summary():
    from prefect import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName

    from deployments.trigger import watch

    t = threading.Thread(target=demo_training)
    t.start()
    try:
        run_id, deadline = None, time.monotonic() + 60
        with get_client(sync_client=True) as c:
            while run_id is None and time.monotonic() < deadline:
                runs = c.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["wait-watch-demo"])))
                run_id = str(runs[0].id) if runs else None
                time.sleep(0.1)
        assert run_id
        out = io.StringIO()
        assert watch(run_id, interval=0.3, out=out) == "COMPLETED"
    finally:
        t.join(60)
    text = out.getvalue()
    lines = text.splitlines()
    assert any(ln.endswith("] Running") for ln in lines) and any(ln.endswith("] Completed") for ln in lines), text
    assert "  epoch 1/2 (50%): eval_f1=0.5" in lines and "  epoch 2/2 (100%): eval_f1=0.5" in lines
    assert lines.index("  epoch 1/2 (50%): eval_f1=0.5") < lines.index("  epoch 2/2 (100%): eval_f1=0.5")
    assert "chatter" not in text
    assert "  # classify: demo version 1" in lines and "  | Aliases | challenger |" in lines
    assert lines[-1].startswith("flow run ") and ": COMPLETED; " in lines[-1] and "s of flow time" in lines[-1]
