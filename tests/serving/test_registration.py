"""`import modeling_segcompass` registers the ``reasoning-segmentation`` pipeline task and
stays light (no trainer-side libraries)."""

import json
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import json, sys

    import modeling_segcompass  # noqa: F401  (the only import of the package)
    from transformers.pipelines import PIPELINE_REGISTRY

    task = PIPELINE_REGISTRY.supported_tasks.get("reasoning-segmentation", {})
    heavy = [m for m in ("trl", "datasets", "matplotlib", "gradio") if m in sys.modules]
    print(json.dumps({"impl": getattr(task.get("impl"), "__name__", None), "heavy": heavy}))
    """
)

BUILD = textwrap.dedent(
    """
    import sys

    sys.path.insert(0, sys.argv[1])
    import torch
    from transformers import pipeline

    from modeling_segcompass import SegCompassConfig, SegCompassForReasoningSegmentation
    from tests.helpers import build_tiny_tokenizer_and_processor

    tokenizer, processor = build_tiny_tokenizer_and_processor(num_slots=3)
    model = SegCompassForReasoningSegmentation(SegCompassConfig.tiny(vocab_size=len(tokenizer)))
    pipe = pipeline("reasoning-segmentation", model=model.eval(), processor=processor)
    print(type(pipe).__name__)
    """
)


def _run(code, *args):
    done = subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.strip().splitlines()[-1]


def test_importing_the_package_registers_the_task_and_stays_light():
    report = json.loads(_run(SCRIPT))
    assert report["impl"] == "ReasoningSegmentationPipeline"
    assert report["heavy"] == []


def test_pipeline_by_task_name_after_a_plain_import(request):
    root = str(request.config.rootpath)
    assert _run(BUILD, root) == "ReasoningSegmentationPipeline"
