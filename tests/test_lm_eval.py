"""The lm-eval harness adapter: a local multiple-choice task, offline, through lm_eval.simple_evaluate."""

from __future__ import annotations

import json

import pytest

from _tiny_run import tiny_run

lm_eval = pytest.importorskip("lm_eval", reason="the lm-eval adapter needs the harness (pip install lm-eval)")
pytestmark = pytest.mark.slow  # importing the harness (transformers, datasets, ...) takes minutes on a busy CPU


def test_the_harness_evaluates_an_lmzoo_checkpoint_on_a_local_task(tmp_path, tmp_path_factory, monkeypatch):
    from lm_eval.tasks import TaskManager

    from lmzoo.integrations.lm_eval import LmzooLM

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    run = tiny_run(tmp_path_factory.getbasetemp() / "tiny_run")
    data = tmp_path / "animals.jsonl"
    rows = [{"ctx": f"the {a} says", "endings": ["meow.", "woof.", "moo."], "label": i}
            for i, a in enumerate(["cat", "dog", "cow"])]
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (tmp_path / "animals.yaml").write_text(
        "task: lmzoo_animals\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        "doc_to_text: '{{ctx}}'\n"
        "doc_to_choice: '{{endings}}'\n"
        "doc_to_target: '{{label}}'\n"
        "metric_list:\n  - metric: acc\n"
    )
    res = lm_eval.simple_evaluate(model=LmzooLM(str(run)), tasks=["lmzoo_animals"],
                                  task_manager=TaskManager(include_path=str(tmp_path)))
    assert res["results"]["lmzoo_animals"]["acc,none"] == 1.0
