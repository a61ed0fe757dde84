//! VHD, VHDX, raw and MS-HRL readers and writers; block iteration
