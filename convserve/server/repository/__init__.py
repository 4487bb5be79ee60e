"""The model repository: config sources (config.json, config.pbtxt, auto-complete), the repository boundary
every model file is read through, load checks, `convserve import`, and the entries the server serves."""
