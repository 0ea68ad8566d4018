"""Batch inference: request parsing (requests), the continuous-batching engine (engine), memory plans (plan)."""
from ling.serving.engine import Engine, EngineConfig, Finished, prefill_pieces, sample_rows
from ling.serving.requests import Limits, Request, RequestError, output_record, parse_line, parse_request

__all__ = ["Engine", "EngineConfig", "Finished", "Limits", "Request", "RequestError", "output_record", "parse_line",
           "parse_request", "prefill_pieces", "sample_rows"]
