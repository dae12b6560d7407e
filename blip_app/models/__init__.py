"""torch and transformers live here: the engine (a loaded captioning model), the image-text matching
model, hardware detection, CPU accelerations, and the model manager."""
