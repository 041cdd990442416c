"""Proposal generators (detectron2's ``modeling/proposal_generator/``): the RPN and the rotated RPN."""

from detlayers.models.proposal_generator.build import build_proposal_generator
from detlayers.models.proposal_generator.rpn import RPN, StandardRPNHead, build_rpn_head, find_top_rpn_proposals
from detlayers.models.proposal_generator.rrpn import RRPN, find_top_rrpn_proposals

__all__ = [
    "build_proposal_generator", "RPN", "StandardRPNHead", "build_rpn_head", "find_top_rpn_proposals", "RRPN",
    "find_top_rrpn_proposals",
]
