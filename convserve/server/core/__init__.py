"""The inference core, transport-neutral: one request path (validate, decode, batch, run, postprocess) and
one control plane (readiness, metadata, config, statistics, repository index, load, unload) that every
front end converts to and from."""
