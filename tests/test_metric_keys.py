"""The keys a run writes are pinned: every metrics.jsonl row, the wandb history and summary.json keep
the names (and order) that dashboards, profiling/compare.py and earlier runs rely on."""

from __future__ import annotations

import json

from distlocal.config import compose
from distlocal.metrics import _wandb_keys
from distlocal.trainer import train

# An epoch at boundary 0 (the run is its own reference).
ROW_KEYS_SGD = (
    'epoch', 'train_loss', 'test_loss', 'test_acc', 'epoch_time_s', 'samples_per_s', 'step_time_s', 'lr',
    'boundary', 'local_lr', 'skipped_updates', 'data_skipped', 'ws_multiplier', 'ws_backoffs', 'rebuild_ms',
    'grad_allreduce_bytes', 'delta_sync_bytes', 'sync_ms', 'u', 'phase_backward_s', 'phase_data_s',
    'phase_optimizer_s', 'phase_prefix_s', 'phase_suffix_fwd_s', 'step_time_ref_s', 'speedup',
    'timed_steps', 'reference_steps', 'profiled_steps', 'profiler_overhead_s', 'footprint_bytes',
    'footprint_param_bytes', 'footprint_buffer_bytes', 'footprint_grad_bytes', 'footprint_optim_bytes',
    'footprint_activation_bytes', 'footprint_temp_bytes', 'footprint_local_bytes',
    'footprint_local_buffer_bytes', 'footprint_ref_bytes', 'footprint_ref_param_bytes',
    'footprint_ref_buffer_bytes', 'footprint_ref_grad_bytes', 'footprint_ref_optim_bytes',
    'footprint_ref_activation_bytes', 'footprint_ref_temp_bytes', 'footprint_ref_local_bytes',
    'footprint_ref_local_buffer_bytes', 'footprint_reduction', 'cuda_step_peak_bytes',
    'cuda_step_peak_ref_bytes', 'activation_bytes', 'activation_bytes_stage', 'activation_bytes_ref',
    'activation_reduction', 'cuda_max_allocated_bytes', 'cuda_max_reserved_bytes', 'nvml_used_bytes',
    'peak_rss_bytes', 'rss_bytes', 'param_bytes', 'grad_bytes', 'optim_state_bytes', 'epoch_cpu_s',
    'epoch_cpu_max_s', 'epoch_device_s', 'train_wall_s', 'train_cpu_s', 'train_cpu_max_s', 'train_device_s',
    'global_step',
)

# An epoch with a local stage: the sync, the rebuild, auto-freeze and drift join.
ROW_KEYS_LOCAL = (
    'epoch', 'train_loss', 'test_loss', 'test_acc', 'epoch_time_s', 'samples_per_s', 'step_time_s', 'lr',
    'boundary', 'local_lr', 'skipped_updates', 'data_skipped', 'ws_multiplier', 'ws_backoffs', 'rebuild_ms',
    'grad_allreduce_bytes', 'delta_sync_bytes', 'sync_ms', 'auto_frozen', 'u', 'phase_backward_s',
    'phase_data_s', 'phase_optimizer_s', 'phase_prefix_s', 'phase_suffix_fwd_s', 'phase_sync_s',
    'phase_rebuild_s', 'step_time_ref_s', 'speedup', 'timed_steps', 'reference_steps', 'profiled_steps',
    'profiler_overhead_s', 'footprint_bytes', 'footprint_param_bytes', 'footprint_buffer_bytes',
    'footprint_grad_bytes', 'footprint_optim_bytes', 'footprint_activation_bytes', 'footprint_temp_bytes',
    'footprint_local_bytes', 'footprint_local_buffer_bytes', 'footprint_ref_bytes',
    'footprint_ref_param_bytes', 'footprint_ref_buffer_bytes', 'footprint_ref_grad_bytes',
    'footprint_ref_optim_bytes', 'footprint_ref_activation_bytes', 'footprint_ref_temp_bytes',
    'footprint_ref_local_bytes', 'footprint_ref_local_buffer_bytes', 'footprint_reduction',
    'cuda_step_peak_bytes', 'cuda_step_peak_ref_bytes', 'activation_bytes', 'activation_bytes_stage',
    'activation_bytes_ref', 'activation_reduction', 'cuda_max_allocated_bytes', 'cuda_max_reserved_bytes',
    'nvml_used_bytes', 'peak_rss_bytes', 'rss_bytes', 'param_bytes', 'grad_bytes', 'optim_state_bytes',
    'drift_max', 'drift_mean', 'epoch_cpu_s', 'epoch_cpu_max_s', 'epoch_device_s', 'train_wall_s',
    'train_cpu_s', 'train_cpu_max_s', 'train_device_s', 'global_step',
)

# wandb history of the local epoch (keys with a value; None is not logged).
WANDB_KEYS_LOCAL = (
    'auto_frozen/0', 'comm/delta_sync_bytes', 'comm/grad_allreduce_bytes', 'local/boundary',
    'local/drift_max', 'local/drift_mean', 'local/local_lr', 'local/skipped_updates', 'local/u',
    'local/ws_backoffs', 'local/ws_multiplier', 'mem/activation_bytes', 'mem/activation_bytes_ref',
    'mem/activation_bytes_stage/0', 'mem/activation_bytes_stage/1', 'mem/activation_bytes_stage/2',
    'mem/activation_bytes_stage/3', 'mem/activation_bytes_stage/4', 'mem/activation_bytes_stage/5',
    'mem/activation_bytes_stage/6', 'mem/activation_reduction', 'mem/footprint_activation_bytes',
    'mem/footprint_buffer_bytes', 'mem/footprint_bytes', 'mem/footprint_grad_bytes',
    'mem/footprint_local_buffer_bytes', 'mem/footprint_local_bytes', 'mem/footprint_optim_bytes',
    'mem/footprint_param_bytes', 'mem/footprint_reduction', 'mem/footprint_ref_activation_bytes',
    'mem/footprint_ref_buffer_bytes', 'mem/footprint_ref_bytes', 'mem/footprint_ref_grad_bytes',
    'mem/footprint_ref_local_buffer_bytes', 'mem/footprint_ref_local_bytes',
    'mem/footprint_ref_optim_bytes', 'mem/footprint_ref_param_bytes', 'mem/footprint_ref_temp_bytes',
    'mem/footprint_temp_bytes', 'mem/grad_bytes', 'mem/optim_state_bytes', 'mem/param_bytes',
    'mem/peak_rss_bytes', 'mem/rss_bytes', 'test/test_acc', 'test/test_loss', 'time/epoch_cpu_max_s',
    'time/epoch_cpu_s', 'time/epoch_time_s', 'time/phase_backward_s', 'time/phase_data_s',
    'time/phase_optimizer_s', 'time/phase_prefix_s', 'time/phase_rebuild_s', 'time/phase_suffix_fwd_s',
    'time/phase_sync_s', 'time/profiled_steps', 'time/profiler_overhead_s', 'time/rebuild_ms',
    'time/reference_steps', 'time/samples_per_s', 'time/speedup', 'time/step_time_ref_s',
    'time/step_time_s', 'time/sync_ms', 'time/timed_steps', 'time/train_cpu_max_s', 'time/train_cpu_s',
    'time/train_wall_s', 'train/data_skipped', 'train/global_step', 'train/lr', 'train/train_loss',
)

SUMMARY_KEYS = (
    'end_to_end_s', 'speedup', 'footprint_ref_bytes', 'footprint_bytes', 'footprint_reduction',
    'activation_bytes_ref', 'activation_bytes', 'activation_reduction', 'grad_allreduce_bytes',
    'delta_sync_bytes', 'comm_bytes_per_step', 'mean_speedup', 'final_activation_reduction', 'train_loop_s',
    'profiler_overhead_s', 'total_steps', 'projected_sgd_s', 'steady_loop_s', 'projected_speedup',
    'projected_sgd_end_to_end_s', 'projected_end_to_end_speedup', 'final_test_acc', 'best_test_acc',
    'final_boundary', 'boundary_per_epoch', 'world_size', 'mode', 'rule', 'data_skipped', 'train_wall_s',
    'train_cpu_s', 'train_cpu_max_s', 'train_device_s', 'tta_split', 'tta_final_acc',
    'time_to_final_acc_step', 'time_to_final_acc_wall_s', 'time_to_final_acc_cpu_s',
    'time_to_final_acc_device_s', 'time_to_acc', 'headline',
)



def test_a_runs_metric_keys_are_pinned(tmp_path) -> None:
    """A 2-epoch run (boundary 0, then 1 with its all-SGD reference) on synthetic data."""
    cfg = compose(["data=synthetic", "data.shape=[3,16,16]", "data.num_classes=4", "data.train_size=64",
                   "data.test_size=8", "model=convnet", "mode=local", "trainer.epochs=2",
                   "trainer.batch_size=8",
                   "trainer.progress=false", "trainer.device=cpu", "schedule.warmup_epochs=1",
                   "profiler.sample_steps=1", "profiler.reference_steps=1", "wandb.mode=disabled",
                   "checkpoint.enabled=false"])
    train(cfg, tmp_path / "run")
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [tuple(r) for r in rows] == [ROW_KEYS_SGD, ROW_KEYS_LOCAL]
    assert tuple(sorted(_wandb_keys(rows[1]))) == WANDB_KEYS_LOCAL
    assert tuple(json.loads((tmp_path / "run" / "summary.json").read_text())) == SUMMARY_KEYS
