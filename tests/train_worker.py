"""Run the tiny training job in a fresh process (tests: several processes, other device counts, killed runs).

    python tests/train_worker.py DEVICES OVERRIDES_JSON

DEVICES fake CPU devices; OVERRIDES_JSON maps dotted config keys to values. The multi-process launch variables
(JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID) come from the environment, as for a real launch.
"""

import json
import os
import sys

if __name__ == "__main__":
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={int(sys.argv[1])}"
    os.environ["JAX_PLATFORMS"] = "cpu"
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # cross-process collectives on CPU

    from configs import transfer2_auto_multiview as cfg_file
    from cosmos_jax.training import trainer

    config = cfg_file.get_config("tiny")
    for key, value in json.loads(sys.argv[2]).items():
        node = config
        *path, last = key.split(".")
        for p in path:
            node = node[p]
        node[last] = value
    summary = trainer.train(config)
    print("LOSSES " + json.dumps({str(k): v for k, v in summary["losses"].items()}), flush=True)
