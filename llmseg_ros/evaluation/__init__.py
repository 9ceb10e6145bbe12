"""ReasonSeg metrics (gIoU, cIoU, ncIoU) and evaluation reports."""
