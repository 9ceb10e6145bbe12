"""Dataset readers and writers: ReasonSeg, LLM-Seg40K, the project's JSONL format and synthetic scenes.

Every reader yields :class:`Sample` objects (RGB image, instruction, 0/1/255 mask).
"""

from llmseg_ros.data.jsonl import JsonlDataset, mask_from_png, read_jsonl_records, write_jsonl
from llmseg_ros.data.llmseg40k import LLMSeg40KDataset, qa_pair, validate_llmseg40k, write_llmseg40k
from llmseg_ros.data.reasonseg import ReasonSegDataset, mask_from_labelme
from llmseg_ros.data.rle import decode_rle, encode_rle
from llmseg_ros.data.sample import IGNORE_VALUE, Sample, check_label_mask

__all__ = [
    "IGNORE_VALUE",
    "JsonlDataset",
    "LLMSeg40KDataset",
    "ReasonSegDataset",
    "Sample",
    "check_label_mask",
    "decode_rle",
    "encode_rle",
    "mask_from_labelme",
    "mask_from_png",
    "qa_pair",
    "read_jsonl_records",
    "validate_llmseg40k",
    "write_jsonl",
    "write_llmseg40k",
]
