"""gemnet: GemNet, multi-bidder menu-based strategy-proof auctions (Wang, Jiang & Parkes, 2024).

Each bidder faces a menu computed from the other bidders' bids and takes its favourite element;
training penalises menus that together over-allocate an item, and :func:`repair` raises prices
(as functions of the others' bids only) until compatibility is certified on the whole value space.
With one bidder GemNet is RochetNet. :func:`verify_certificate` re-checks a certificate
independently of the code that built it.
"""

from gemnet.certificate import Certificate, load_certificate, save_certificate
from gemnet.evaluate import OverAllocationSearch, adversarial_over_allocation, repair_breakdown
from gemnet.model import (
    GemNet,
    GemNetConfig,
    Menus,
    choose,
    menu_bounds,
    menu_utilities,
    quantize_bids,
)
from gemnet.repair import RepairConfig, RepairedGemNet, RepairError, certifiable_share, repair
from gemnet.train import (
    GemNetTrainConfig,
    incompatibility,
    load_gemnet,
    over_allocation,
    save_gemnet,
    train_gemnet,
)
from gemnet.verify import VerificationReport, assert_certified, verify_certificate

__all__ = [
    "Certificate",
    "GemNet",
    "GemNetConfig",
    "GemNetTrainConfig",
    "Menus",
    "OverAllocationSearch",
    "RepairConfig",
    "RepairError",
    "RepairedGemNet",
    "VerificationReport",
    "adversarial_over_allocation",
    "assert_certified",
    "certifiable_share",
    "choose",
    "incompatibility",
    "load_certificate",
    "load_gemnet",
    "menu_bounds",
    "menu_utilities",
    "over_allocation",
    "quantize_bids",
    "repair",
    "repair_breakdown",
    "save_certificate",
    "save_gemnet",
    "train_gemnet",
    "verify_certificate",
]
