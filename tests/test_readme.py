"""Every command the README shows is exercised: each one names the test that runs it, each `segjobs` line
parses with the real argument parser, and the workstation launch (`accelerate launch -m launcher.train`) runs."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path


from launcher.cli import build_parser
from tests.jobspecs import write_spec

REPO = Path(__file__).resolve().parents[1]
ACCELERATE = "tests/test_readme.py::test_accelerate_launch_trains_a_spec"

# A README command (regex on the line without its comment) -> the test that runs it.
EXERCISED = [
    (r"^make demo$", "tests/test_demo.py::test_demo_runs_the_three_models_end_to_end_and_reuses_a_finished_run"),
    (r"^make test$", "tests/test_readme.py::test_every_readme_command_is_exercised"),  # CI runs `make test` itself
    (r"^python3 -m venv \.venv && \.venv/bin/pip install -e \.$", "tests/test_shard.py::test_data_commands_do_not_import_torch"),
    (r"^segjobs synth ade20k", "tests/test_synth.py::test_layout_labels_and_object_info"),
    (r"^segjobs synth video", "tests/test_video.py::test_the_synthetic_clip_moves_and_depends_only_on_the_seed"),
    (r"^segjobs shard video", "tests/test_video.py::test_frames_are_sampled_by_time_scaled_down_and_read_back_by_the_loader"),
    (r"^segjobs visualize .*--video", "tests/test_video.py::test_visualize_writes_an_mp4_and_a_gif_of_every_kept_frame"),
    (r"^segjobs shard ade20k", "tests/test_shard.py::test_round_trip_keeps_original_bytes"),
    (r"^segjobs shard verify", "tests/test_shard.py::test_verify_names_the_shard_with_a_flipped_byte"),
    (r"^segjobs shard images", "tests/test_shard.py::test_image_folder_shards_have_no_labels_and_dotless_keys"),
    (r"^segjobs profiles", "tests/test_profiles.py::test_profiles_lists_every_profile_as_a_table_and_as_json"),
    (r"^segjobs submit .*--profile", "tests/test_profiles.py::test_a_profile_fills_only_what_the_spec_and_set_leave_unwritten"),
    (r"^segjobs submit .*--after", "tests/slurm/test_chain.py::test_profile_and_after_chain_jobs_and_resume_submits_the_recorded_profile"),
    (r"^segjobs eval .*--submit", "tests/slurm/test_chain.py::test_eval_submit_waits_for_the_training_then_writes_its_report_which_status_shows"),
    (r"^segjobs submit .*--dry-run", "tests/test_submit.py::test_sweep_is_one_array_with_a_run_per_point"),
    (r"^segjobs submit .*--sweep", "tests/slurm/test_cluster.py::test_sweep_submits_one_array_of_runs"),
    (r"^segjobs submit ", "tests/slurm/test_cluster.py::test_submit_runs_to_completion_and_status_shows_it"),
    (r"^segjobs compare", "tests/test_compare.py::test_the_table_shows_one_row_per_point_with_plus_minus"),
    (r"^segjobs predict", "tests/test_predict.py::test_segmenter_writes_ade20k_coloured_classes_and_dataset_labels"),
    (r"^segjobs export", "tests/test_predict.py::test_export_loads_back_into_the_same_network"),
    (r"^segjobs plan", "tests/test_dino_parity.py::test_plan_of_the_paper_recipe_is_main_dinos_schedules"),
    (r"^segjobs show", "tests/slurm/test_show.py::test_show_of_a_requeued_run_lists_both_starts_and_the_requeue"),
    (r"^segjobs status", "tests/slurm/test_cluster.py::test_submit_runs_to_completion_and_status_shows_it"),
    (r"^segjobs logs", "tests/test_submit.py::test_local_executor_runs_a_spec_end_to_end"),
    (r"^segjobs (cancel|resume)", "tests/test_submit.py::test_cancel_then_resume_continues_from_the_checkpoint"),
    (r"tools/minicluster (up|down|env)", "tests/slurm/conftest.py::cluster"),  # `make test` runs up and down
    (r"^segjobs train --model", "tests/test_train.py::test_the_seed_shortcut_maps_to_spec_fields"),
    (r"^segjobs train ", "tests/test_train.py::test_demo_specs_validate_and_take_steps"),
    (r"^torchrun ", "tests/test_train.py::test_ddp_two_processes_resume_exactly_and_elastically"),
    (r"^accelerate launch ", ACCELERATE),
    (r"^segjobs eval", "tests/test_demo.py::test_eval_of_a_constant_prediction_matches_the_hand_computed_numbers"),
    (r"^segjobs visualize", "tests/test_demo.py::test_every_picture_is_written_with_the_expected_size"),
    (r"^segjobs models", "tests/test_models.py::test_models_command_lists_every_variant_with_counts"),
    (r"^\.venv/bin/python tools/bench_\w+\.py", "tools/ (benchmarks: run by hand, figures in the README)"),
]


def readme_commands() -> list[str]:
    """Lines of the README's unlabelled code blocks (shell commands), comments removed."""
    commands, fence, shell = [], False, False
    for line in (REPO / "README.md").read_text().splitlines():
        if line.startswith("```"):
            fence, shell = not fence, not fence and line == "```"
            continue
        if shell and line.strip():
            commands.append(re.sub(r"\s+#.*$", "", line).strip())
    return commands


def readme_table_commands() -> list[str]:
    """Commands quoted in the README's figure table."""
    return re.findall(r"^\| `((?:segjobs|make|\.venv/bin/python) [^`]+)` \|", (REPO / "README.md").read_text(), re.M)


def test_every_readme_command_is_exercised():
    commands = readme_commands() + readme_table_commands()
    assert len(commands) > 30
    for command in commands:
        matches = [test for pattern, test in EXERCISED if re.search(pattern, command)]
        assert matches, f"README command without a test: {command}"
        path, _, name = matches[0].partition("::")
        if path.endswith(".py"):
            assert re.search(rf"^def {re.escape(name)}\(", (REPO / path).read_text(), re.M), f"{command}: {matches[0]} is gone"


def test_every_segjobs_line_parses():
    for command in readme_commands() + readme_table_commands():
        if command.startswith("segjobs "):
            words = re.sub(r"\[[^\]]*\]", "", command).split()[1:]  # synopsis lines: drop [optional] parts
            build_parser().parse_args(words)  # exits (fails the test) on an unknown flag or command


def test_accelerate_launch_trains_a_spec(shard_root, tmp_path):
    """README: `accelerate launch --multi_gpu -m launcher.train SPEC` on a GPU workstation; here one CPU process."""
    spec = write_spec(tmp_path, shard_root, "segmenter", name="accel", train={"max_steps": 2})
    done = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "1",
                           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                           "-m", "launcher.train", str(spec)], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "accel" / "checkpoints" / "step_00000002").is_dir()
