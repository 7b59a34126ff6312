from iommupt_store.cli import main

main()
