"""One jit-compiled train step of a tiny PSPNet on a fixed global batch; writes the
resulting parameters and BN statistics to an .npz. Run with different simulated device
counts (XLA_FLAGS=--xla_force_host_platform_device_count=N) to compare them. With a
teacher model directory the step distils from it (channel-wise, weight 5), for one step: its
steeper loss grows float32 reduction-order differences between device counts past 1e-5 by
the second step (measured on the test's teacher: 4e-6 after one step, 3e-4 after two).

  python tests/scripts/one_train_step.py OUT.npz [TEACHER_DIR]
"""

import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from configs.semseg_recipe import base_config
from pspnet_jax import checkpoint
from pspnet_jax import mesh as mesh_lib
from pspnet_jax.models import PSPNetConfig
from pspnet_jax.train import OptimizerConfig, distill, make_optimizer, make_train_step


def main(out, teacher=None):
  cfg = PSPNetConfig(depth=18, num_classes=4, base_width=8, head_channels=16, aux_channels=8)
  model = checkpoint.create_model(cfg, seed=0)
  graphdef, params, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)
  tx = make_optimizer(OptimizerConfig(learning_rate=0.05), total_steps=10)
  rng = np.random.default_rng(0)
  images = rng.standard_normal((4, 33, 33, 3)).astype(np.float32)
  labels = rng.integers(0, 4, (4, 33, 33)).astype(np.int32)
  labels[:, :5] = 255
  mesh = mesh_lib.data_mesh()
  replicated = NamedSharding(mesh, P())
  d = None
  if teacher:
    config = base_config()
    config.distill.teacher = teacher
    d = distill.from_config(config, cfg)
  state = jax.device_put(
    {
      'params': params,
      'batch_stats': batch_stats,
      'opt_state': tx.init(params),
      'step': jnp.zeros((), jnp.int32),
      'rng': jax.random.key_data(jax.random.key(0)),
      **({'teacher': d.variables} if d else {}),
    },
    replicated,
  )
  batch = mesh_lib.global_batch({'image': images, 'label': labels}, mesh)
  step = jax.jit(
    make_train_step(graphdef, tx, aux_weight=0.4, ignore_label=255, distill=d),
    in_shardings=(replicated, NamedSharding(mesh, P('data'))),
    out_shardings=(replicated, replicated),
    donate_argnums=(0,),
  )
  for _ in range(1 if d else 2):
    state, metrics = step(state, batch)
  flat = {
    '/'.join(map(str, k)): np.asarray(v[...])
    for k, v in nnx.to_flat_state(nnx.merge_state(state['params'], state['batch_stats']))
  }
  flat['__loss'] = np.asarray(metrics['loss'])
  if d:
    flat['__distill_loss'] = np.asarray(metrics['distill_loss'])
  flat['__devices'] = np.asarray(jax.device_count())
  np.savez(out, **flat)


if __name__ == '__main__':
  main(*sys.argv[1:])
