"""Data: reading records, tokenizing them correctly for any tokenizer, and the LightningDataModules."""

from lit_align.data.collate import SFTCollator
from lit_align.data.instruction import InstructionDataModule
from lit_align.data.preference import PreferenceCollator, PreferenceDataModule
from lit_align.data.prompts import PromptCollator, PromptDataModule
from lit_align.data.sources import DataError, read_records
from lit_align.data.templates import TemplateSet, load_templates
from lit_align.data.tokenize import SegmentEncoder
from lit_align.data.unpaired import UnpairedCollator, UnpairedDataModule

__all__ = [
    "DataError",
    "InstructionDataModule",
    "PreferenceCollator",
    "PreferenceDataModule",
    "PromptCollator",
    "PromptDataModule",
    "SFTCollator",
    "SegmentEncoder",
    "TemplateSet",
    "UnpairedCollator",
    "UnpairedDataModule",
    "load_templates",
    "read_records",
]
