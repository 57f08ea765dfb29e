"""One process of the localhost multi-process test (run by test_distributed.py).

  python -m tests.distributed_worker PORT NUM_PROCESSES PROCESS_ID DEVICES FEATURES WORKDIR STEPS
"""
import json
import os
import sys


def main():
  port, nproc, pid, ndev, features, workdir, steps = sys.argv[1:8]
  os.environ["JAX_PLATFORMS"] = "cpu"
  import jax
  jax.config.update("jax_num_cpu_devices", int(ndev))
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(f"localhost:{port}", num_processes=int(nproc),
                             process_id=int(pid), initialization_timeout=120)
  from glue_jax.train import loop
  from tests import train_utils
  cfg = train_utils.tiny_config(features, steps=int(steps), mesh={"data": -1, "fsdp": 2})
  out = loop.train(cfg, workdir)
  print("RESULT " + json.dumps({"process": jax.process_index(), "devices": jax.device_count(),
                                "step": out["step"], "loss": out.get("loss")}), flush=True)
  jax.distributed.shutdown()


if __name__ == "__main__":
  main()
