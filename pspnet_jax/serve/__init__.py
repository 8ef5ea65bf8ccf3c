"""Serving a model over HTTP: ``python -m pspnet_jax.serve MODEL_DIR``, an API and a page
to upload a photo and see it segmented (docs/serving.md). Needs the ``serve`` extra
(Starlette, uvicorn); the model and evaluation code know nothing of it.

  segmenter = Segmenter('runs/synthetic', EvalConfig(mode='whole', base_size=96))
  segmenter.warm_up([(96, 96)])
  app = create_app(segmenter, Limits(max_pixels=16 << 20, max_upload_bytes=20 << 20))
"""
