import torch
from torch.profiler import profile, ProfilerActivity
from experiments.bench import architectures, techniques
from fastattn.processor import FastAttnProcessor, StepState
from fastattn.methods import Method
from fastattn.models import get_adapter
from fastattn.kernels import prefer_fast_dense
dev = torch.device("cuda")
for arch, res, images in (("dit_xl_2", 512, 8), ("pixart_sigma_xl", 1024, 1)):
    bm = architectures.build(arch, res, images, dev, torch.bfloat16)
    attn = get_adapter(bm.transformer).attention_layers(bm.transformer)[0]
    x = torch.randn(2 * images, bm.seq_len, attn.to_q.in_features, device=dev, dtype=torch.bfloat16)
    st = StepState(1, True, 0.125); orig = attn.processor; proc = FastAttnProcessor(0, st, orig); attn.set_processor(proc)
    with torch.no_grad(), prefer_fast_dense():
        st.set_step([Method.FULL], [True], [True]); attn(x)
        for m in (Method.FULL, Method.ASC, Method.WARS):
            st.set_step([m], [False], [True], write_caches=False)
            for _ in range(5): attn(x)
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                for _ in range(10): attn(x)
                torch.cuda.synchronize()
            print("=====", arch, m.value)
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=60))
            print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=6, max_name_column_width=60))
