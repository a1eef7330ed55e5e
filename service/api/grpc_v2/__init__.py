"""The Open Inference Protocol over gRPC (inference.GRPCInferenceService), beside the HTTP routes."""
