"""CITATION.cff: CFF 1.2.0 required keys, and the six backbone papers in references."""
from pathlib import Path

import yaml

CFF = yaml.safe_load((Path(__file__).resolve().parent.parent / 'CITATION.cff').read_text())


def test_required_software_fields():
    assert CFF['cff-version'] == '1.2.0' and CFF['type'] == 'software'
    for key in ('message', 'title', 'authors', 'version', 'date-released', 'license'):
        assert CFF.get(key), key
    assert isinstance(CFF['date-released'], str)  # the schema wants a quoted date string


def test_six_backbone_papers_are_referenced():
    titles = ' | '.join(ref['title'] for ref in CFF['references'])
    for name in ('SpaRTAN', 'Scale-Aware Modulation', 'S2AFormer', 'EMSNet', 'MAT', 'Partial Attention'):
        assert name in titles, name
    assert len(CFF['references']) == 6
    allowed = {'article', 'conference-paper', 'thesis', 'software'}
    for ref in CFF['references']:
        assert ref['type'] in allowed and ref['authors'] and ref['year']
        assert all('family-names' in a or 'name' in a for a in ref['authors'])
