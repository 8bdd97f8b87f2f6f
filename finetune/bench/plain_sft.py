"""A minimal plain TRL fine-tuning script: the baseline that `invoke bench` measures the train stage against.

It is what an engineer writes by hand without this project: chats from a JSONL file through `datasets`,
TRL's SFTTrainer with a peft LoraConfig, train, save the adapter, merge it into a 16-bit copy of the base
and save that for llama.cpp. It imports nothing from the `finetune` package. `invoke bench` runs it in the
train image (same packages) with the run config's hyperparameters, passed as keyword arguments:

    python plain_sft.py --model DIR_OR_HUB_ID --data chats.jsonl --spec spec.json --out DIR

spec.json: {"sft": SFTConfig kwargs, "lora": LoraConfig kwargs, "qlora": true|false, "revision": str|null}.
Writes OUT/result.json: tokens seen, training seconds, peak memory, parameter count.
"""

import argparse
import json
import resource
import time
from pathlib import Path

import torch
from datasets import load_dataset
from peft import LoraConfig, PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
from trl import SFTConfig, SFTTrainer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--spec", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    spec = json.loads(Path(args.spec).read_text())
    out = Path(args.out)
    sft = spec["sft"]
    dtype = torch.bfloat16 if sft.get("bf16") else torch.float16 if sft.get("fp16") else torch.float32

    dataset = load_dataset("json", data_files=args.data, split="train").select_columns(["messages"])
    tokenizer = AutoTokenizer.from_pretrained(args.model, revision=spec.get("revision"))
    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                      bnb_4bit_compute_dtype=dtype) if spec.get("qlora") else None
    model = AutoModelForCausalLM.from_pretrained(args.model, revision=spec.get("revision"), dtype=dtype,
                                                 quantization_config=quantization,
                                                 device_map="auto" if quantization else None)
    parameters = sum(p.numel() for p in model.parameters())
    trainer = SFTTrainer(model=model, args=SFTConfig(output_dir=str(out / "checkpoints"), report_to=[], **sft),
                         train_dataset=dataset, processing_class=tokenizer, peft_config=LoraConfig(**spec["lora"]))
    started = time.time()
    trainer.train()
    seconds = time.time() - started
    peak = (torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available()
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    tokens = int(trainer.state.num_input_tokens_seen)  # counted when sft has include_num_input_tokens_seen

    trainer.model.save_pretrained(out / "adapter")
    del model, trainer
    base = AutoModelForCausalLM.from_pretrained(args.model, revision=spec.get("revision"),
                                                dtype=torch.bfloat16 if sft.get("bf16") else torch.float16)
    PeftModel.from_pretrained(base, out / "adapter").merge_and_unload().save_pretrained(out / "merged")
    tokenizer.save_pretrained(out / "merged")

    result = {"tokens_seen": tokens, "train_seconds": round(seconds, 3), "peak_memory_mb": round(peak, 1),
              "parameters": parameters}
    (out / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
