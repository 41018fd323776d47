"""The documents of a packed batch on the host: cu_seqlens read once per batch, not once per attention call.

The attention calls need the document boundaries as Python ints (the training kernels build their block tables from
them), and reading a device tensor on the host waits for the device. `document_layout(cu_seqlens)` reads them once;
a model passes the result to every layer's call on that batch (`layout=`), and a call without it reads cu_seqlens
itself.

A call cannot compare the layout with cu_seqlens' values without that wait: it checks what the host knows (the number
of boundaries; wall_attn also that the last one is the sequence length) and then uses the layout's boundaries as
given. The caller must pass the layout of the same cu_seqlens.
"""
import torch


class DocumentLayout:
    """The boundaries of cu_seqlens as a tuple of ints (`bounds`), and the longest document (`max_seqlen`)."""

    def __init__(self, bounds):
        self.bounds = tuple(bounds)
        self.max_seqlen = max(end - start for start, end in zip(self.bounds[:-1], self.bounds[1:]))

    def __repr__(self):
        return f'DocumentLayout({len(self.bounds) - 1} documents, bounds {self.bounds[0]} ... {self.bounds[-1]})'


@torch.compiler.disable  # a host read: outside any compiled graph
def document_layout(cu_seqlens):
    """The layout of cu_seqlens [num_docs + 1] (int32 or int64), read to the host once."""
    check_cu_seqlens(cu_seqlens)
    return DocumentLayout(cu_seqlens.tolist())


def check_cu_seqlens(cu_seqlens):
    """What can be checked of cu_seqlens without reading it: a 1-D integer tensor of at least two boundaries."""
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError('`cu_seqlens` must be a 1-D tensor [num_docs + 1]')
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise TypeError(f'`cu_seqlens` must be int32 or int64, got {cu_seqlens.dtype}')


def layout_of(cu_seqlens, layout=None):
    """`layout`, checked against cu_seqlens as far as the host can without reading it, or else cu_seqlens' own."""
    if layout is None:
        return document_layout(cu_seqlens)
    if not isinstance(layout, DocumentLayout):
        raise TypeError(f'`layout` must be a kernels.DocumentLayout (kernels.document_layout(cu_seqlens)), got '
                        f'{type(layout).__name__}')
    if len(layout.bounds) != cu_seqlens.numel():
        raise ValueError(f'`layout` holds {len(layout.bounds)} boundaries but `cu_seqlens` {cu_seqlens.numel()}: '
                         f'pass kernels.document_layout(cu_seqlens) of the same cu_seqlens')
    return layout
