"""Exports a run's model: merged as a Hugging Face checkpoint, or a LoRA run's adapters alone
in PEFT's format.

    python launch/export.py --run=runs/grpo --hf=runs/grpo_hf          # transformers, vLLM
    python launch/export.py --run=runs/grpo_lora --peft=runs/grpo_peft  # PeftModel, lora.init

`--hf` writes the run's latest model (a LoRA run's adapters merged into its
base, rebuilt from the recorded source) as safetensors with its config and
tokenizer; `--peft` writes adapter_config.json and adapter_model.safetensors,
which `peft.PeftModel.from_pretrained` loads onto the transformers model of
the same base and `--config.lora.init` starts another run from. `--name`
picks the run's model (`policy`, or `orm` for an ORM run).
"""

import os
import sys

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

flags.DEFINE_string("run", None, "The run directory (its --workdir).", required=True)
flags.DEFINE_string("hf", "", "Where the merged Hugging Face checkpoint goes.")
flags.DEFINE_string("peft", "", "Where the LoRA adapters go, in PEFT's format.")
flags.DEFINE_string("name", "policy", "The run's model: policy, or orm.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    f = flags.FLAGS
    if not (f.hf or f.peft):
        raise app.UsageError("Give --hf, --peft or both.")
    from rl_reason.experiments import sources

    if f.peft:
        settings = sources.export_peft_run(f.run, f.peft, f.name)
        print(f"{f.peft}: rank-{settings.rank} adapters on {', '.join(settings.targets)}")
    if f.hf:
        import jax

        from rl_reason.models.hf_export import export_hf
        from rl_reason.parallel import mesh as mesh_lib
        from rl_reason.parallel import sharding as shd

        mesh = mesh_lib.make_mesh((1, 1, 1), devices=jax.devices()[:1])
        loaded = sources.load_run(f.run, mesh, shd.DEFAULT_RULES, f.name)
        export_hf(f.hf, loaded.config.replace(heads=()), loaded.params, loaded.tokenizer)
        print(f"{f.hf}: {loaded.config.num_params() / 1e6:.1f}M parameters, merged")


if __name__ == "__main__":
    app.run(main)
