"""The built-in plugins of ``balancer``.

They register through the same entry point group as third-party plugins (``balancer``), with
this module as the entry point; the core never imports it directly.
"""

from __future__ import annotations

from collections.abc import Callable

from balancer import Plugin, hookimpl

from .aligned_mtl import AlignedMTL, AlignedMTLOptions
from .balanced_dpo import BalancedDPO, BalancedDPOOptions
from .cagrad import CAGrad, CAGradOptions
from .config import ConFIG, ConFIGOptions
from .constant import Constant, ConstantOptions
from .cosmos import COSMOS, COSMOSOptions
from .crmogm import CRMOGM, CRMOGMOptions
from .dualproj import DualProj, DualProjOptions
from .dwa import DWA, DWAOptions
from .excess_mtl import ExcessMTL, ExcessMTLOptions
from .fairgrad import FairGrad, FairGradOptions
from .famo import FAMO, FAMOOptions
from .gls import GLS, GLSOptions
from .graddrop import GradDrop, GradDropOptions
from .gradnorm import GradNorm, GradNormOptions
from .gradvac import GradVac, GradVacOptions
from .imtl_g import IMTLG, IMTLGOptions
from .imtl_l import IMTL, IMTLL, IMTLLOptions, IMTLOptions
from .krum import Krum, KrumOptions
from .mgda import MGDA, MGDAOptions
from .modo import MoDo, MoDoOptions
from .mt_grpo import MTGRPO, MTGRPOOptions
from .nash_mtl import NashMTL, NashMTLOptions
from .pbi import PBI, PBIOptions
from .pcd import PCD, PCDOptions
from .pcgrad import PCGrad, PCGradOptions
from .replay_bias import ReplayBias, ReplayBiasOptions
from .rlw import RLW, RLWOptions
from .sdmgrad import SDMGrad, SDMGradOptions
from .stch import STCH, STCHOptions
from .task_norm import TaskNorm, TaskNormOptions
from .trimmed_mean import TrimmedMean, TrimmedMeanOptions
from .uncertainty import Uncertainty, UncertaintyOptions
from .upgrad import UPGrad, UPGradOptions

__all__ = [
    "AlignedMTL",
    "AlignedMTLOptions",
    "BalancedDPO",
    "BalancedDPOOptions",
    "CAGrad",
    "CAGradOptions",
    "ConFIG",
    "ConFIGOptions",
    "Constant",
    "ConstantOptions",
    "COSMOS",
    "COSMOSOptions",
    "CRMOGM",
    "CRMOGMOptions",
    "DualProj",
    "DualProjOptions",
    "DWA",
    "DWAOptions",
    "ExcessMTL",
    "ExcessMTLOptions",
    "FAMO",
    "FAMOOptions",
    "FairGrad",
    "FairGradOptions",
    "GLS",
    "GLSOptions",
    "GradNorm",
    "GradNormOptions",
    "GradDrop",
    "GradDropOptions",
    "GradVac",
    "GradVacOptions",
    "IMTLG",
    "IMTLGOptions",
    "IMTL",
    "IMTLL",
    "IMTLLOptions",
    "IMTLOptions",
    "Krum",
    "KrumOptions",
    "MGDA",
    "MGDAOptions",
    "MoDo",
    "MoDoOptions",
    "MTGRPO",
    "MTGRPOOptions",
    "NashMTL",
    "NashMTLOptions",
    "PCD",
    "PCDOptions",
    "PBI",
    "PBIOptions",
    "PCGrad",
    "PCGradOptions",
    "RLW",
    "RLWOptions",
    "SDMGrad",
    "SDMGradOptions",
    "STCH",
    "STCHOptions",
    "ReplayBias",
    "ReplayBiasOptions",
    "TaskNorm",
    "TaskNormOptions",
    "TrimmedMean",
    "TrimmedMeanOptions",
    "Uncertainty",
    "UncertaintyOptions",
    "UPGrad",
    "UPGradOptions",
]

BUILTIN_PLUGINS: tuple[type[Plugin], ...] = (
    TaskNorm,
    BalancedDPO,
    ReplayBias,
    PCGrad,
    IMTLG,
    AlignedMTL,
    GradVac,
    FAMO,
    DWA,
    RLW,
    MGDA,
    UPGrad,
    DualProj,
    CAGrad,
    NashMTL,
    Uncertainty,
    GLS,
    GradNorm,
    IMTLL,
    IMTL,
    ConFIG,
    Krum,
    FairGrad,
    GradDrop,
    TrimmedMean,
    MTGRPO,
    PCD,
    CRMOGM,
    Constant,
    ExcessMTL,
    MoDo,
    SDMGrad,
    COSMOS,
    PBI,
    STCH,
)


@hookimpl
def balancer_register_plugins(register: Callable[[type[Plugin]], None]) -> None:
    for plugin_class in BUILTIN_PLUGINS:
        register(plugin_class)
