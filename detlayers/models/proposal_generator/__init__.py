"""Proposal generators (detectron2's ``modeling/proposal_generator/``): the RPN."""

from detlayers.models.proposal_generator.build import build_proposal_generator
from detlayers.models.proposal_generator.rpn import RPN, StandardRPNHead, build_rpn_head, find_top_rpn_proposals

__all__ = ["build_proposal_generator", "RPN", "StandardRPNHead", "build_rpn_head", "find_top_rpn_proposals"]
