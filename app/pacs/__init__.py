"""Work from the PACS over DICOMweb: search and open studies (QIDO-RS, WADO-RS), store results back (STOW-RS).

- :mod:`app.pacs.client`: one configured server (``app.config.PacsServer``), typed results, readable errors.
- :mod:`app.pacs.derived`: the DICOM objects stored back for a run (SCs and a Segmentation), identity chosen once.

No web code here (``app.web.pacs`` holds the routes); every call blocks, so routes run them in a thread pool.
"""
