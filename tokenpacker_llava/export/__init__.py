"""Sharing trained models: remote code, model cards and pushing folders to the Hub."""

from tokenpacker_llava.export.hub import HubPushError, files_to_upload, prepare_folder, push_folder
from tokenpacker_llava.export.model_card import count_parameters, write_model_card
from tokenpacker_llava.export.remote_code import RemoteCodeError, generate_remote_code, write_remote_code

__all__ = [
    "HubPushError",
    "RemoteCodeError",
    "count_parameters",
    "files_to_upload",
    "generate_remote_code",
    "prepare_folder",
    "push_folder",
    "write_model_card",
    "write_remote_code",
]
