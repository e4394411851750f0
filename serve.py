"""Serve a checkpoint over HTTP: python serve.py ckpt=<checkpoint or run folder> port=8000 (see conf/serve.yaml)."""

import hydra
from omegaconf import DictConfig

from gpt.config import entry, register_resolvers

register_resolvers()


@hydra.main(version_base="1.3", config_path="conf", config_name="serve")
@entry
def main(cfg: DictConfig) -> None:
    import uvicorn

    from gpt.inference import is_quantized, load_for_inference
    from gpt.serve import Engine, Limits, create_app
    from gpt.trainer import Precision

    model, tokenizer, ckpt = load_for_inference(cfg.ckpt, cfg.device, cfg.quantize)
    dtype = None if is_quantized(model) else Precision(cfg.device, cfg.autocast_dtype).dtype
    engine = Engine(model, tokenizer, cfg.device, dtype, ckpt["path"])
    uvicorn.run(create_app(engine, Limits(**cfg.limits)), host=cfg.host, port=int(cfg.port), log_level="info")


if __name__ == "__main__":
    main()
