"""The gRPC front end: the convserve.v1 and KServe v2 servicers (with Triton's extensions), the edge that
wraps every RPC, and token auth. Servicers convert protobuf to the core's objects and back."""
