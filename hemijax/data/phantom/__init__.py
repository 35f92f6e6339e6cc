"""Built-in MRI phantoms: MNI152 anatomy, MR-physics contrast, tumours / WM lesions, several layouts.

Anatomy comes from the MNI152 2009a template and GM/WM probability maps that the `nilearn` wheel
ships (read from its package data, never downloaded). Every subject gets its own random smooth
deformation. Image contrast is computed from per-tissue proton density, T1 and T2 through the
spin-echo and inversion-recovery signal equations with per-sequence TR/TE/TI drawn from a named
protocol; then a smooth bias field, Rician noise and an arbitrary per-file intensity scale.
Contrasts: FLAIR, T1, T1ce, T2 and, on request, PD (`--modalities flair,t1,t2,pd`). The `tissue6`
task labels the deep structures of Dorent et al. 2019 by tissue and MNI position
(`anatomy.structures`: a coarse mapping, not an atlas).

  python -m hemijax.data.phantom --task tumor --out DIR --n-subjects 20 --seed 0 --spacing 2
  python -m hemijax.data.phantom --montage docs/phantom_montage.png

Modules: random_fields (smooth fields, rotations), acquisition (tissue and protocol tables, signal
equations, one image), anatomy (MNI152 atlas, deformations), lesions (tumours, WM lesions),
subject (one subject), writer (datasets on disk), montage (docs figure), cli (the command line).
See docs/data.md for the equations, the parameter tables, the protocols and the file layouts.
"""
from hemijax.data.phantom.acquisition import (MODALITIES, NORMAL_TISSUES, PROTOCOLS, TISSUES,
                                              Protocol, Sequence, Tissue, get_protocol, mr_signal,
                                              post_contrast_t1)
from hemijax.data.phantom.anatomy import (STRUCTURES, atlas, brain_total, random_deformation,
                                          structures)
from hemijax.data.phantom.cli import main
from hemijax.data.phantom.lesions import TUMOR_LABELS
from hemijax.data.phantom.lesions import _tumor_geometry  # noqa: F401 (tests/test_phantom.py)
from hemijax.data.phantom.montage import render_montage
from hemijax.data.phantom.random_fields import smooth_field
from hemijax.data.phantom.subject import generate_subject
from hemijax.data.phantom.writer import (CHANNEL_NAMES, LAYOUTS, SPLIT_FRACTIONS, VERSION,
                                         nifti_bytes, split_cases, write_dataset)

__all__ = [
    "CHANNEL_NAMES", "LAYOUTS", "MODALITIES", "NORMAL_TISSUES", "PROTOCOLS", "SPLIT_FRACTIONS",
    "STRUCTURES", "TISSUES", "TUMOR_LABELS", "VERSION", "Protocol", "Sequence", "Tissue", "atlas",
    "brain_total", "generate_subject", "get_protocol", "main", "mr_signal", "nifti_bytes",
    "post_contrast_t1", "random_deformation", "render_montage", "smooth_field", "split_cases",
    "structures", "write_dataset",
]
