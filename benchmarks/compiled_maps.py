"""Memory mappings held by compiled CPU programs, and what releasing them frees (the cause of the
long-run crash of issue 10: a process exhausts vm.max_map_count, 65 530, with compiled code).

    python benchmarks/compiled_maps.py        # Linux (/proc/self/maps)
"""

import gc

import jax
import jax.numpy as jnp

import jaxdrag
from jaxdrag.tiny import ensure_tiny


def maps() -> int:
    with open("/proc/self/maps") as f:
        return sum(1 for _ in f)


def main():
    pipe = jaxdrag.load_pipeline(ensure_tiny()[0], dtype="float32")
    print("start", maps())
    for h in range(64, 128, 8):  # 8 shapes × (encode, decode) = 16 programs
        pipe.decode_to_uint8(pipe.encode_images(jnp.zeros((2, h, 128, 3))), (h, 128))
        print(f"height {h}: {maps()} mappings, {pipe.stages.live} programs held")
    pipe.stages.clear()
    gc.collect()
    print("after dropping the stage cache only", maps())
    pipe.release_compiled()
    gc.collect()
    print("after release_compiled (the jitted functions too)", maps())
    jax.clear_caches()
    gc.collect()
    print("after jax.clear_caches", maps())


if __name__ == "__main__":
    main()
