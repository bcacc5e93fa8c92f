"""The Open Inference Protocol (KServe's "v2", also spoken by Triton, Seldon MLServer and TorchServe) over REST and
gRPC: another route and another decoding and rendering over the same registry, predictor and batcher
(docs/protocols.md).

    catalog.py      which v2 models there are (NAME-encoder, NAME-decoder, NAME-scorer per served model version), their
                    versions (the served model's), tensors' names, datatypes and shapes, and each one's parameters ->
                    the predictor's Call
    codec.py        v2 tensors: JSON data and raw bytes (the binary tensor data extension) <-> numpy, checked against
                    a model's metadata; REST bodies in and out
    inference.py    one inference: the version named, held while the Call goes through its predictor and batcher (as
                    /v1's answer); the outputs as arrays
    repository.py   the model repository extension (index, load, unload) over the registry, behind the admin key
    rest.py         the /v2 routes on the HTTP port
    grpc_server.py  GRPCInferenceService (grpc.aio, on the same event loop) on its own port
"""
