import traceback

import torch

from sfi.tools.bench import bench_ours, random_model

m = random_model("qwen3-4b", 131072, torch.device("cuda"), torch.bfloat16)
try:
    print(bench_ours(m, 131072, 3, 16))
except torch.OutOfMemoryError:
    traceback.print_exc(limit=-6)
    print(torch.cuda.memory_summary(abbreviated=True)[:1500])
